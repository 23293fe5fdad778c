"""What the schedulers share: ``SchedulerOutput``, the β/ᾱ schedule, config files and swaps, and the two kinds of
timestep bookkeeping.

- ``AlphaScheduler`` (DDPM, DDIM) looks each timestep up in a table of per-step coefficients: a step is a few
  elementwise kernels with no 0-d tensor arithmetic, no ``nonzero()`` search and no host sync.
- ``SigmaScheduler`` (DPM-Solver, UniPC, Euler, Heun) walks a σ list and counts its steps (``step_index``), finding
  its place from the first timestep it is given (or ``set_begin_index``), as diffusers does.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, overload

import numpy as np
import torch
from torch import Tensor

from ddpm import schedule as S
from ddpm.checkpoint import SCHEDULER_CONFIG_NAME, resolve_file
from ddpm.config import read_json, write_json
from ddpm.outputs import BaseOutput
from ddpm.schedulers.config import SchedulerConfig, betas_tuple, swap_in, with_metadata

logger = logging.getLogger(__name__)

Timestep = Union[int, float, Tensor]
SchedulerT = TypeVar("SchedulerT", bound="BaseScheduler")


@dataclass
class SchedulerOutput(BaseOutput):
    """x_{t-1} and (DDPM, DDIM, Euler, Heun) the step's prediction of x_0, both shaped like ``sample``."""
    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


def common_dtype(model_output: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    """Both tensors in their promoted dtype (what diffusers' result has); free when the dtypes already agree."""
    if model_output.dtype == sample.dtype:
        return model_output, sample
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    return model_output.to(dtype), sample.to(dtype)


def config_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """A constructor's keyword arguments (its ``locals()`` on entry) as config fields, ``trained_betas`` as a tuple."""
    fields = {k: v for k, v in arguments.items() if k not in ("self", "__class__", "metadata")}
    return {**fields, "trained_betas": betas_tuple(fields["trained_betas"])}


class BaseScheduler:
    """The β/ᾱ schedule of training, and diffusers' config methods (``from_config``, ``save_config`` ...)."""

    config_class: ClassVar[type[SchedulerConfig]]
    config_name: ClassVar[str] = SCHEDULER_CONFIG_NAME
    order: ClassVar[int] = 1  # model calls per step of the schedule
    default_num_inference_steps: ClassVar[int | None]  # what Pipeline runs when not told
    _deprecated_kwargs: ClassVar[list[str]] = []  # diffusers' tests read it; ddpm deprecates nothing
    config: Any
    _given: set[str]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        # The arguments the caller chose; diffusers records the others as `_use_default_values` so that a swap to
        # another scheduler (from_config) gives that scheduler's own defaults for them.
        bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs).arguments
        self._given = {k for k in bound if k not in ("self", "metadata")}
        return self

    def _build_betas(self, config: SchedulerConfig, metadata: Mapping[str, Any], zero_snr_floor: bool) -> None:
        unknown = [k for k in metadata if not k.startswith("_")]
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
        self.config = with_metadata(config, self._given, {})
        betas = S.make_betas(config.beta_schedule, config.num_train_timesteps, config.beta_start,  # type: ignore[arg-type]
                             config.beta_end, config.trained_betas)
        zero_snr = bool(getattr(config, "rescale_betas_zero_snr", False))
        if zero_snr:
            betas = S.rescale_zero_terminal_snr(betas)
        self.betas: Tensor = betas  # [T] float32, CPU
        self.alphas: Tensor = 1.0 - betas
        self.alphas_cumprod: Tensor = S.alphas_cumprod(betas)
        if zero_snr and zero_snr_floor:  # the σ-based samplers keep σ_T = √((1 − ᾱ_T)/ᾱ_T) finite, as diffusers
            self.alphas_cumprod[-1] = 2**-24

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.num_train_timesteps)

    def __len__(self) -> int:
        return self.num_train_timesteps

    @property
    def compatibles(self) -> list[type[BaseScheduler]]:
        """The scheduler classes whose ``from_config`` takes this scheduler's config: the whole family."""
        from ddpm.schedulers import SCHEDULERS  # the package's table of classes (it imports this module)

        return list(SCHEDULERS.values())

    # ------------------------------------------------------------------------------------------ files

    @classmethod
    def from_config(cls: type[SchedulerT], config: Mapping[str, Any], return_unused_kwargs: bool = False,
                    **overrides: Any) -> Any:
        """Build from the config of any scheduler of the family: ours, diffusers' ``FrozenDict`` or a JSON dict;
        ``overrides`` replace keys. With ``return_unused_kwargs`` also return the keys kept aside for other
        schedulers. The rules of the swap are in ``ddpm.schedulers.config``."""
        if not isinstance(config, Mapping):
            raise TypeError(f"from_config takes a config mapping, got {type(config).__name__}; use "
                            f"{cls.__name__}.from_pretrained(path) for a folder or hub repo")
        kwargs, carried = swap_in(cls.config_class, config, overrides)
        scheduler = cls(**kwargs)
        with_metadata(scheduler.config, scheduler._given, carried)
        return (scheduler, dict(carried)) if return_unused_kwargs else scheduler

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike[str], return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, subfolder: str | None = None) -> Any:
        """The ``scheduler_config.json`` of a folder or hub repo (optionally its ``subfolder``) as a plain dict, as
        diffusers' ``load_config`` returns it; with the flags, a tuple that adds the unused keyword arguments (none)
        and the hub commit hash (None for a local folder)."""
        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder)
        assert path is not None
        outputs: tuple[Any, ...] = (read_json(path),)
        if return_unused_kwargs:
            outputs += ({},)
        if return_commit_hash:
            match = re.search(r"snapshots/([0-9a-f]{40})/", Path(path).as_posix())
            outputs += (match.group(1) if match else None,)
        return outputs[0] if len(outputs) == 1 else outputs

    @classmethod
    def from_pretrained(cls: type[SchedulerT], pretrained_model_name_or_path: str | os.PathLike[str],
                        subfolder: str | None = None, **overrides: Any) -> SchedulerT:
        """Load ``scheduler_config.json`` from a folder or hub repo (optionally its ``subfolder``). The file may be
        any scheduler's of the family: it is swapped in as ``from_config`` does."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        scheduler: SchedulerT = cls.from_config(config, **overrides)
        return scheduler

    def save_config(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``scheduler_config.json`` (diffusers' format, ``_class_name`` set) into ``save_directory``."""
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"{folder} is a file; save_config needs a folder")
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / self.config_name, self.config.to_json_dict())
        logger.info("Configuration saved in %s", folder / self.config_name)

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Same as ``save_config``: a scheduler is its config."""
        self.save_config(save_directory)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


# ---------------------------------------------------------------------------------------------- DDPM and DDIM

class AlphaScheduler(BaseScheduler):
    """What DDPM and DDIM share: integer timesteps looked up in a coefficient table, add_noise, velocity, clipping."""

    init_noise_sigma = 1.0  # x_T ~ N(0, I)

    def _setup(self, config: SchedulerConfig, metadata: Mapping[str, Any]) -> None:
        self._build_betas(config, metadata, zero_snr_floor=False)
        self._device_alphas_cumprod: dict[torch.device, Tensor] = {}  # copies for add_noise; state stays put
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self._set_schedule(list(range(config.num_train_timesteps - 1, -1, -1)), None)

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


# ---------------------------------------------------------------------------------------------- σ-based samplers

class SigmaScheduler(BaseScheduler):
    """What DPM-Solver, UniPC, Euler and Heun share: a σ list walked by counting steps, and add_noise on it."""

    unlisted_is_last: ClassVar[bool]  # DPM/UniPC: an unlisted first timestep means the last step; Euler/Heun: error
    variance_preserving: ClassVar[bool]  # add_noise as α_t x + σ_t ε (True) or x + σ ε (Euler, Heun)
    sigmas: Tensor  # float32, CPU: the σ of each step and the final one
    timesteps: Tensor
    num_inference_steps: int | None

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, device: str | torch.device | None,
                      dtype: torch.dtype) -> None:
        self.sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
        on_cpu = torch.from_numpy(timesteps).to(dtype)
        self.timesteps = on_cpu.to(device)
        values = on_cpu.tolist()
        self._timestep_values: list[float] = values  # a host copy: look-ups never read the device
        self._positions: dict[float, list[int]] | None = None  # value → positions, built on the first look-up
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """The position in the schedule of the next step (None until the first ``step`` or ``scale_model_input``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Where sampling starts, if set by ``set_begin_index`` (img2img-style pipelines); else None."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at position ``begin_index`` of the schedule, whatever its first timestep."""
        self._begin_index = begin_index

    def _timestep_value(self, timestep: Timestep) -> float:
        if isinstance(timestep, Tensor) and timestep.device.type != "cpu" and timestep._base is self.timesteps:
            # a view of self.timesteps on an accelerator: its position, not its value, so no host sync
            return self._timestep_values[timestep.storage_offset() - self.timesteps.storage_offset()]
        return float(timestep)

    def index_for_timestep(self, timestep: Timestep, schedule_timesteps: Tensor | None = None) -> int:
        """The position of ``timestep`` in the schedule; where it repeats (Heun's inner timesteps, rounded Karras
        σ), its second occurrence, so that starting mid-schedule does not skip a σ (diffusers' rule), except that a
        loop started at the first timestep starts at the first σ (diffusers starts at the second there and runs
        off the end of its σ list)."""
        t = self._timestep_value(timestep)
        if schedule_timesteps is None and self._timestep_values and t == self._timestep_values[0]:
            return 0
        if schedule_timesteps is None:
            if self._positions is None:
                self._positions = {}
                for i, value in enumerate(self._timestep_values):
                    self._positions.setdefault(value, []).append(i)
            candidates = self._positions.get(t, [])
        else:
            candidates = [i for i, v in enumerate(schedule_timesteps.tolist()) if v == t]
        if not candidates:
            if self.unlisted_is_last:
                return len(self._timestep_values) - 1
            raise ValueError(f"timestep={t} is not one of this scheduler's timesteps (set by set_timesteps)")
        return candidates[1] if len(candidates) > 1 else candidates[0]

    def _init_step_index(self, timestep: Timestep) -> int:
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        return self._step_index

    def _check_ready(self) -> int:
        if self.num_inference_steps is None:
            raise ValueError(f"num_inference_steps is None: call set_timesteps before stepping a {type(self).__name__}")
        return len(self._timestep_values)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Noise clean samples to the σ of ``timesteps`` (entries of this schedule): α x_0 + σ_t ε with
        α = 1/√(σ² + 1), σ_t = σ α (DPM-Solver, UniPC), or x_0 + σ ε (Euler, Heun), as diffusers. Computed in
        float32 (float64 for float64 inputs), returned in the inputs' dtype."""
        if self._begin_index is None:
            steps = [self.index_for_timestep(t) for t in timesteps]
        else:
            steps = [self._step_index if self._step_index is not None else self._begin_index] * len(timesteps)
        out_dtype = torch.promote_types(original_samples.dtype, noise.dtype)
        dtype = torch.promote_types(out_dtype, torch.float32)
        sigma = self.sigmas[steps].to(device=original_samples.device, dtype=dtype)
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
        x0, eps = original_samples.to(dtype), noise.to(dtype)
        if self.variance_preserving:
            alpha = 1 / ((sigma**2 + 1) ** 0.5)
            return (alpha * x0 + (sigma * alpha) * eps).to(out_dtype)
        return (x0 + eps * sigma).to(out_dtype)


@overload
def output(prev: Tensor, x0: Tensor | None, return_dict: Literal[True]) -> SchedulerOutput: ...
@overload
def output(prev: Tensor, x0: Tensor | None, return_dict: Literal[False]) -> tuple[Tensor, ...]: ...
@overload
def output(prev: Tensor, x0: Tensor | None, return_dict: bool) -> SchedulerOutput | tuple[Tensor, ...]: ...


def output(prev: Tensor, x0: Tensor | None, return_dict: bool) -> SchedulerOutput | tuple[Tensor, ...]:
    """A step's result as diffusers returns it: a ``SchedulerOutput``, or the plain tuple of its present fields."""
    out = SchedulerOutput(prev, x0)
    return out if return_dict else out.to_tuple()
