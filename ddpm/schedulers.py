"""DDPMScheduler and DDIMScheduler: diffusers-shaped wrappers over the maths in ``ddpm.schedule``.

Same constructor arguments, defaults, methods and ``scheduler_config.json`` as diffusers 0.42.1, so
``from ddpm import DDPMScheduler`` replaces ``from diffusers import DDPMScheduler``. What is faster here: the
per-step coefficients of a schedule are computed once by ``set_timesteps`` and looked up by timestep, so a
step is a handful of elementwise kernels with no 0-d tensor arithmetic, no ``nonzero()`` search and no host
sync (see ``_timestep_int``). Deliberate differences from diffusers are listed in docs/parity.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, overload

import numpy as np
import torch
from torch import Tensor

from ddpm import schedule as S
from ddpm.checkpoint import SCHEDULER_CONFIG_NAME, resolve_file
from ddpm.config import (FrozenConfig, check_choice, check_int, check_number, config_from_dict, config_to_dict,
                         read_json, write_json)
from ddpm.outputs import BaseOutput

Generator = Union[torch.Generator, Sequence[torch.Generator], None]
Timestep = Union[int, Tensor]
# Keys written by very old diffusers versions that carry no meaning today; dropped silently on load.
LEGACY_KEYS = ("tensor_format",)


@dataclass
class SchedulerOutput(BaseOutput):
    """x_{t-1} and the step's prediction of x_0, both shaped like ``sample``."""
    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


@dataclass(frozen=True)
class _SchedulerConfig(FrozenConfig):
    """The ``scheduler_config.json`` keys both schedulers share: diffusers' names and defaults."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: S.BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    prediction_type: S.PredictionType = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: S.TimestepSpacing = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class DDPMSchedulerConfig(_SchedulerConfig):
    variance_type: S.VarianceType = "fixed_small"


@dataclass(frozen=True)
class DDIMSchedulerConfig(_SchedulerConfig):
    set_alpha_to_one: bool = True


AnyConfig = Union[DDPMSchedulerConfig, DDIMSchedulerConfig]


def _validate(c: _SchedulerConfig) -> None:
    check_int("num_train_timesteps", c.num_train_timesteps, minimum=1)
    check_choice("beta_schedule", c.beta_schedule, S.BETA_SCHEDULES)
    check_choice("prediction_type", c.prediction_type, S.PREDICTION_TYPES)
    check_choice("timestep_spacing", c.timestep_spacing, S.TIMESTEP_SPACINGS)
    if isinstance(c, DDPMSchedulerConfig):
        check_choice("variance_type", c.variance_type, S.VARIANCE_TYPES)
    flags = ["clip_sample", "thresholding", "rescale_betas_zero_snr"]
    for key in flags + (["set_alpha_to_one"] if isinstance(c, DDIMSchedulerConfig) else []):
        if not isinstance(getattr(c, key), bool):
            raise TypeError(f"{key}={getattr(c, key)!r} must be True or False")
    # β_t in (0, 1) keeps every ᾱ_t in (0, 1): 1 − ᾱ_t = 0 would divide 0 by 0 in the last step's posterior
    # (Eq. 7 of Ho et al.), and β_t = 1 would zero ᾱ from t on. float32 is what the schedule is stored in.
    start, end = check_number("beta_start", c.beta_start), check_number("beta_end", c.beta_end)
    if c.trained_betas is not None:
        if isinstance(c.trained_betas, list):
            object.__setattr__(c, "trained_betas", tuple(c.trained_betas))
        if not isinstance(c.trained_betas, tuple):
            raise TypeError(f"trained_betas={c.trained_betas!r} must be a list of numbers or None")
        if len(c.trained_betas) != c.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(c.trained_betas)} values but num_train_timesteps="
                             f"{c.num_train_timesteps}")
        for i, b in enumerate(c.trained_betas):
            if not 0 < check_number(f"trained_betas[{i}]", b) < 1 or np.float32(1) - np.float32(b) == 1:
                raise ValueError(f"trained_betas[{i}]={b} must be in (0, 1) (and at least 1e-7: 1 - beta must "
                                 f"differ from 1 in float32)")
    elif c.beta_schedule != "squaredcos_cap_v2":  # the cosine schedule does not use beta_start/beta_end
        if not 0 < start <= end < 1 or np.float32(1) - np.float32(start) == 1:
            raise ValueError(f"beta_start={start} and beta_end={end} must satisfy 0 < beta_start <= beta_end < 1 "
                             f"(and beta_start >= 1e-7: 1 - beta_start must differ from 1 in float32)")
    if c.rescale_betas_zero_snr and c.num_train_timesteps < 2:  # Lin et al. 2023 shift ᾱ_1..ᾱ_T: needs two
        raise ValueError(f"rescale_betas_zero_snr=True needs num_train_timesteps >= 2, got {c.num_train_timesteps}")
    check_int("steps_offset", c.steps_offset, minimum=0)
    if c.steps_offset >= c.num_train_timesteps:
        raise ValueError(f"steps_offset={c.steps_offset} must be less than num_train_timesteps="
                         f"{c.num_train_timesteps}")
    if not 0 < check_number("dynamic_thresholding_ratio", c.dynamic_thresholding_ratio) <= 1:
        raise ValueError(f"dynamic_thresholding_ratio={c.dynamic_thresholding_ratio!r} must be in (0, 1]")
    for key in ("clip_sample_range", "sample_max_value"):
        if check_number(key, getattr(c, key)) <= 0:
            raise ValueError(f"{key}={getattr(c, key)} must be positive")



def draw_noise(shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """N(0, I) noise drawn exactly as diffusers' ``randn_tensor`` draws it, so seeded runs match.

    A CPU generator with a non-CPU ``device`` draws on the CPU and copies over; a list of generators draws
    sample i of the batch from generator i (so each sample is reproducible whatever the batch size).
    """
    if generator is None or isinstance(generator, torch.Generator):  # the common case, kept cheap
        if generator is None or generator.device.type == device.type:
            return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    gens = list(generator) if isinstance(generator, Sequence) else [generator]
    if len(gens) not in (1, shape[0]):
        raise ValueError(f"generator: got a list of {len(gens)} generators for a batch of {shape[0]}")
    draw_on = device
    g_device = gens[0].device if gens[0] is not None else device
    if g_device.type != device.type:
        if g_device.type != "cpu":
            raise ValueError(f"generator is on {g_device} but the noise is wanted on {device}")
        draw_on = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(tuple(shape), generator=gens[0], device=draw_on, dtype=dtype).to(device)
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, device=draw_on, dtype=dtype) for g in gens]).to(device)


def _common_dtype(model_output: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    # One dtype for the step maths (the promoted one: what diffusers' result has). Equal dtypes, the
    # usual case, cost nothing; mixed ones (an autocast model output) compute in the wider dtype.
    if model_output.dtype == sample.dtype:
        return model_output, sample
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    return model_output.to(dtype), sample.to(dtype)


SchedulerT = TypeVar("SchedulerT", bound="_Scheduler")


class _Scheduler:
    """What DDPM and DDIM share: the β/ᾱ schedule, timesteps, add_noise, and the config file."""

    config_class: ClassVar[type]
    _class_name: ClassVar[str]
    _other_keys: ClassVar[tuple[str, ...]]  # keys of the other scheduler, dropped by from_config
    order = 1
    init_noise_sigma = 1.0  # x_T ~ N(0, I)

    config: Any

    def _build(self, config: AnyConfig) -> None:
        self.config = config
        betas = S.make_betas(config.beta_schedule, config.num_train_timesteps, config.beta_start,
                             config.beta_end, config.trained_betas)
        if config.rescale_betas_zero_snr:
            betas = S.rescale_zero_terminal_snr(betas)
        self.betas: Tensor = betas  # [T] float32, CPU
        self.alphas: Tensor = 1.0 - betas
        self.alphas_cumprod: Tensor = S.alphas_cumprod(betas)
        self._device_alphas_cumprod: dict[torch.device, Tensor] = {}  # copies for add_noise; state stays put
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self._set_schedule(list(range(config.num_train_timesteps - 1, -1, -1)), None)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.num_train_timesteps)

    def __len__(self) -> int:
        return self.num_train_timesteps

    def _set_schedule(self, timesteps: list[int], device: str | torch.device | None) -> None:
        self._timesteps = timesteps
        self._position = {t: i for i, t in enumerate(timesteps)}
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)  # [n] int64, descending
        self._coefficient_cache: dict[Any, dict[int, Any]] = {}

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Choose the sampling timesteps: ``num_inference_steps`` spaced by ``config.timestep_spacing``, or an
        explicit strictly descending list ``timesteps`` in [0, num_train_timesteps). Not both."""
        T = self.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps and timesteps, not both")
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if not ts:
                raise ValueError("timesteps is empty")
            for i in range(1, len(ts)):
                if ts[i] >= ts[i - 1]:
                    raise ValueError(f"timesteps must be strictly descending: {ts[i - 1]} is followed by {ts[i]}")
            if ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, num_train_timesteps={T}), got {ts[0]}..{ts[-1]}")
            self.num_inference_steps, self.custom_timesteps = None, True
            self._set_schedule(ts, device)
            return
        if num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps or timesteps")
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps={T}]")
        ts = S.inference_timesteps(T, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset)
        if ts[0] >= T:
            raise ValueError(f"steps_offset={self.config.steps_offset} pushes timestep {ts[0]} past "
                             f"num_train_timesteps={T} at num_inference_steps={num_inference_steps}")
        self.num_inference_steps, self.custom_timesteps = num_inference_steps, False
        self._set_schedule(ts, device)

    def _timestep_int(self, timestep: Timestep) -> int:
        if isinstance(timestep, Tensor):
            if timestep.device.type != "cpu" and timestep._base is self.timesteps:
                # `for t in scheduler.timesteps` on an accelerator yields views of self.timesteps: read the
                # position from the view's storage offset instead of the value from the device (a host sync).
                return self._timesteps[timestep.storage_offset() - self.timesteps.storage_offset()]
            return int(timestep)  # a CPU tensor: no device sync
        return int(timestep)

    def _next_listed(self, t: int) -> int:
        i = self._position.get(t)
        if i is None:
            raise ValueError(f"timestep={t} is not one of this scheduler's timesteps (set by set_timesteps)")
        return self._timesteps[i + 1] if i + 1 < len(self._timesteps) else -1

    def scale_model_input(self, sample: Tensor, timestep: Timestep | None = None) -> Tensor:
        """Identity: DDPM and DDIM feed x_t to the model unscaled."""
        return sample

    def _alphas_cumprod_on(self, device: torch.device) -> Tensor:
        if device not in self._device_alphas_cumprod:
            self._device_alphas_cumprod[device] = self.alphas_cumprod.to(device)
        return self._device_alphas_cumprod[device]

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor | int) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Eq. 4 of Ho et al.) for x_0, ε: [B, C, H, W] and timesteps: [B].
        Computed in float32 (float64 for float64 inputs); returns the inputs' dtype; never changes the scheduler."""
        ac = self._alphas_cumprod_on(original_samples.device)
        return S.add_noise(ac, original_samples, noise, torch.as_tensor(timesteps, device=ac.device))

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor | int) -> Tensor:
        """v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022); shapes and dtypes as ``add_noise``."""
        ac = self._alphas_cumprod_on(sample.device)
        return S.velocity(ac, sample, noise, torch.as_tensor(timesteps, device=ac.device))

    def _clip(self, x0: Tensor, model_output: Tensor) -> Tensor:
        # Clip or dynamically threshold x̂_0 (never in place on the caller's tensor)
        c = self.config
        if c.thresholding:
            return S.dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        if c.clip_sample:
            r = c.clip_sample_range
            return x0.clamp(-r, r) if x0 is model_output else x0.clamp_(-r, r)
        return x0

    # ------------------------------------------------------------------------------------------ files

    @classmethod
    def from_config(cls: type[SchedulerT], config: Any, **overrides: Any) -> SchedulerT:
        """Build from a config object or dict of either scheduler (the other one's keys are dropped)."""
        d: dict[str, Any] = (
            dataclasses.asdict(config) if isinstance(config, (DDPMSchedulerConfig, DDIMSchedulerConfig)) else dict(config))
        d.update(overrides)
        cfg: AnyConfig = config_from_dict(cls.config_class, d, ignore=cls._other_keys + LEGACY_KEYS)
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})

    @classmethod
    def from_pretrained(cls: type[SchedulerT], path_or_repo_id: str | os.PathLike[str], subfolder: str | None = None,
                        **overrides: Any) -> SchedulerT:
        """Load ``scheduler_config.json`` from a folder or hub repo (optionally its ``subfolder``)."""
        path = resolve_file(path_or_repo_id, SCHEDULER_CONFIG_NAME, subfolder)
        assert path is not None
        return cls.from_config(read_json(path), **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``scheduler_config.json`` (diffusers' format, ``_class_name`` set) into ``save_directory``."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_json(Path(save_directory) / SCHEDULER_CONFIG_NAME, config_to_dict(self.config, self._class_name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    # A constructor's keyword arguments (its locals() on entry) as config fields: the betas as a tuple of floats
    fields = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
    return {**fields, "trained_betas": _betas_tuple(fields["trained_betas"])}


def _betas_tuple(trained_betas: Any) -> tuple[float, ...] | None:
    # A list, array or tensor of β_t as the config's tuple of Python floats (their values are checked by _validate)
    if trained_betas is None:
        return None
    if isinstance(trained_betas, Tensor):
        trained_betas = trained_betas.detach().cpu().double().numpy()
    try:
        betas = np.asarray(trained_betas)
    except ValueError:  # ragged nested lists
        betas = np.asarray(None)
    if betas.ndim != 1 or betas.dtype.kind not in "iuf":
        raise TypeError(f"trained_betas must be a 1-D list, array or tensor of numbers, got "
                        f"{type(trained_betas).__name__} with shape {betas.shape} and dtype {betas.dtype}")
    return tuple(float(b) for b in betas)


class DDPMScheduler(_Scheduler):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2), with diffusers' options. ``step`` turns the model
    output at x_t into x_{t-1} ~ N(μ̃_t, σ_t²) (Eqs. 6-7)."""

    config_class = DDPMSchedulerConfig
    _class_name = "DDPMScheduler"
    default_num_inference_steps: ClassVar[int | None] = None  # Pipeline's default: every step (contract 3)
    _other_keys = ("set_alpha_to_one",)
    config: DDPMSchedulerConfig

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: S.BetaSchedule = "linear",
                 trained_betas: Sequence[float] | np.ndarray | Tensor | None = None,
                 variance_type: S.VarianceType = "fixed_small", clip_sample: bool = True,
                 prediction_type: S.PredictionType = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: S.TimestepSpacing = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False) -> None:
        self._build(DDPMSchedulerConfig(**_arguments(locals())))
        self.variance_type = variance_type

    def _coefficients(self, t: int) -> S.DDPMCoefficients:
        table = self._coefficient_cache.get(None)
        if table is None:  # the whole schedule at once, t_i → t_{i+1} (or → x_0 after the last)
            ts = self._timesteps
            rows = S.ddpm_coefficients(self.alphas_cumprod, ts, ts[1:] + [-1], self.config.variance_type)
            table = self._coefficient_cache[None] = dict(zip(ts, rows))
        if t not in table:
            raise ValueError(f"timestep={t} is not one of this scheduler's timesteps (set by set_timesteps)")
        return table[t]

    def previous_timestep(self, timestep: Timestep) -> Timestep:
        """The timestep after ``timestep`` in the schedule, −1 after the last (an int, or a tensor for a tensor)."""
        prev = self._next_listed(self._timestep_int(timestep))
        return torch.tensor(prev, device=timestep.device) if isinstance(timestep, Tensor) else prev

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             return_dict: Literal[True] = True) -> SchedulerOutput: ...

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None, *,
             return_dict: Literal[False]) -> tuple[Tensor, Tensor]: ...

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One reverse step x_t → x_{t-1}. model_output: [B, C, H, W] (or [B, 2C, H, W] with the variance
        channels for learned/learned_range); sample: x_t [B, C, H, W]. Noise is drawn from ``generator``
        only for t > 0, as diffusers draws it."""
        t = self._timestep_int(timestep)
        c = self._coefficients(t)
        vt = self.config.variance_type
        noise_dtype = model_output.dtype  # diffusers draws the noise in the model's dtype
        model_output, sample = _common_dtype(model_output, sample)
        predicted_variance = None
        if vt in ("learned", "learned_range"):
            if model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={vt!r} needs model_output with 2x the sample's channels "
                                 f"({2 * sample.shape[1]}), got {model_output.shape[1]}")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        x0 = S.predict_x0(self.config.prediction_type, model_output, sample, c.sqrt_alpha_prod, c.sqrt_beta_prod)
        x0 = self._clip(x0, model_output)
        prev = S.ddpm_mean(x0, sample, c)
        if t > 0:
            noise = draw_noise(model_output.shape, generator, model_output.device, noise_dtype)
            if predicted_variance is None:
                prev.add_(noise.mul_(c.std))  # x_{t-1} = μ̃_t + σ_t z, Algorithm 2 of Ho et al.
            else:
                prev.add_(S.ddpm_learned_std(vt, predicted_variance, c) * noise)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class DDIMScheduler(_Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021): ``step`` follows Eq. 12 with σ_t(η) of Eq. 16;
    η = 0 is deterministic, η = 1 is DDPM-like. Samples a 1000-step DDPM model in ~50 steps."""

    config_class = DDIMSchedulerConfig
    _class_name = "DDIMScheduler"
    default_num_inference_steps: ClassVar[int | None] = 50  # Pipeline's default, as diffusers' DDIMPipeline
    _other_keys = ("variance_type",)
    config: DDIMSchedulerConfig

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: S.BetaSchedule = "linear",
                 trained_betas: Sequence[float] | np.ndarray | Tensor | None = None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: S.PredictionType = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: S.TimestepSpacing = "leading",
                 rescale_betas_zero_snr: bool = False) -> None:
        self._build(DDIMSchedulerConfig(**_arguments(locals())))
        # ᾱ "before" the last step: 1 (a clean x_0) or ᾱ_0 (Sec. 4.2 of Song et al. leaves it open)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def previous_timestep(self, timestep: Timestep) -> Timestep:
        """t − T // n for spaced schedules (as diffusers; for trailing/linspace this is not always the next
        listed timestep), the next listed one for custom timesteps; < 0 means the step to x_0."""
        t = self._timestep_int(timestep)
        if self.custom_timesteps:
            prev = self._next_listed(t)
        elif self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before stepping a DDIMScheduler")
        else:
            prev = t - self.num_train_timesteps // self.num_inference_steps
        return torch.tensor(prev, device=timestep.device) if isinstance(timestep, Tensor) else prev

    def _coefficients(self, t: int, eta: float) -> S.DDIMCoefficients:
        table = self._coefficient_cache.get(eta)
        if table is None:  # the listed timesteps at once; others (rare) are added one by one
            ts = self._timesteps
            prevs = [int(self.previous_timestep(s)) for s in ts]
            rows = S.ddim_coefficients(self.alphas_cumprod, ts, prevs, self.final_alpha_cumprod, eta)
            table = self._coefficient_cache[eta] = dict(zip(ts, rows))
        if t not in table:
            if not 0 <= t < self.num_train_timesteps:
                raise ValueError(f"timestep={t} must lie in [0, num_train_timesteps={self.num_train_timesteps})")
            prev = int(self.previous_timestep(t))
            table[t] = S.ddim_coefficients(self.alphas_cumprod, [t], [prev], self.final_alpha_cumprod, eta)[0]
        return table[t]

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generator = None,
             variance_noise: Tensor | None = None, return_dict: Literal[True] = True) -> SchedulerOutput: ...

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generator = None,
             variance_noise: Tensor | None = None, *, return_dict: Literal[False]) -> tuple[Tensor, Tensor]: ...

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generator = None,
             variance_noise: Tensor | None = None, return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One DDIM step x_t → x_prev (Eq. 12 of Song et al.). model_output, sample: [B, C, H, W]. With
        ``use_clipped_model_output`` ε is re-derived from the clipped x̂_0 (as GLIDE does). For η > 0 the noise
        is ``variance_noise`` or drawn from ``generator`` (not both)."""
        if self.num_inference_steps is None and not self.custom_timesteps:
            raise ValueError("num_inference_steps is None: call set_timesteps before stepping a DDIMScheduler")
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        c = self._coefficients(self._timestep_int(timestep), float(eta))
        pt = self.config.prediction_type
        noise_dtype = model_output.dtype  # diffusers draws the noise in the model's dtype
        model_output, sample = _common_dtype(model_output, sample)
        x0 = S.predict_x0(pt, model_output, sample, c.sqrt_alpha_prod, c.sqrt_beta_prod)
        eps = S.predict_epsilon(pt, model_output, sample, x0, c.sqrt_alpha_prod, c.sqrt_beta_prod)
        x0 = self._clip(x0, model_output)
        if use_clipped_model_output:
            eps = S.eps_from_x0(sample, x0, c.sqrt_alpha_prod, c.sqrt_beta_prod)
        prev = S.ddim_prev_sample(x0, eps, c)
        if eta > 0:
            if variance_noise is None:  # + σ_t z, Eq. 12 of Song et al.
                prev.add_(draw_noise(model_output.shape, generator, model_output.device, noise_dtype).mul_(c.std))
            else:
                prev.add_(c.std * variance_noise)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
