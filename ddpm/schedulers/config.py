"""The six scheduler configs, and the rules by which ``from_config`` moves a config from one scheduler to another.

Each config is a frozen dataclass whose fields are the keys (and defaults) of the diffusers 0.42.1 class of the same
name, so ``scheduler_config.json`` files round-trip both ways. As mappings they read like diffusers' ``FrozenDict``:
``dict(config)`` holds the fields, then the metadata diffusers keeps there (keys that belong to another scheduler
and were carried through a swap, ``_use_default_values``, ``_class_name``, ``_diffusers_version``).

Swapping (``DPMSolverMultistepScheduler.from_config(ddpm.config)``), as diffusers does it:
- keys listed in ``_use_default_values`` were never chosen by the user, so the new scheduler uses its own defaults;
- keys of another scheduler of the family are kept aside (and written on save, so a swap back restores them) and
  logged at debug level; a key that no scheduler here knows is a ValueError naming it;
- a ``solver_type`` or ``algorithm_type`` value that only another solver understands (DPM-Solver's "midpoint" in
  UniPC, DEIS's "logrho") falls back to this scheduler's default, as diffusers' constructors do.
Values no scheduler can run, and diffusers options ddpm does not implement, are a ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

import numpy as np
import torch

from ddpm import schedule as S
from ddpm import solvers as V
from ddpm.config import (DIFFUSERS_VERSION, FrozenConfig, _field_names, _freeze, _thaw, check_choice, check_int,
                         check_number)

logger = logging.getLogger(__name__)

# Keys written by very old diffusers versions that carry no meaning today; dropped silently on load.
LEGACY_KEYS = ("tensor_format",)
FinalSigmas = Literal["zero", "sigma_min"]
FINAL_SIGMAS: tuple[FinalSigmas, ...] = ("zero", "sigma_min")
# solver_type / algorithm_type values of other multistep solvers (diffusers' DEIS writes "logrho" and "deis")
FOREIGN_SOLVER_TYPES = ("midpoint", "heun", "bh1", "bh2", "logrho")
FOREIGN_ALGORITHM_TYPES = ("deis",)


@dataclass(frozen=True, eq=False)
class SchedulerConfig(FrozenConfig):
    """What every scheduler's config has: the β schedule, the model's prediction type and the timestep spacing.

    Like diffusers' ``FrozenDict`` it is a read-only ``dict`` (diffusers' own ``from_config`` accepts only dicts, so
    ``diffusers.DPMSolverMultistepScheduler.from_config(ddpm_scheduler.config)`` works too); its dict storage
    mirrors the mapping. Equality is that of the mappings (fields and metadata), as for ``FrozenDict``; compare
    ``dataclasses.astuple`` for the fields alone."""

    _class_name: ClassVar[str]
    beta_schedules: ClassVar[tuple[str, ...]] = S.BETA_SCHEDULES

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: S.PredictionType = "epsilon"
    timestep_spacing: S.TimestepSpacing = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        _check_schedule(self)

    # ---- diffusers' FrozenDict view: fields, then metadata (FrozenConfig keeps the dict storage in step)

    def __reduce__(self) -> tuple[Any, ...]:  # copy/pickle: rebuild from the fields, then the metadata
        return (_rebuild, (type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                           dict(self.__dict__.get("_extra", {}))))

    def _metadata(self) -> dict[str, Any]:
        meta = dict(self.__dict__.get("_extra", {}))
        meta["_class_name"] = self._class_name
        meta["_diffusers_version"] = DIFFUSERS_VERSION
        return meta

    def __getattr__(self, name: str) -> Any:  # only reached for non-fields: the carried keys of other schedulers
        extra = self.__dict__.get("_extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no key {name!r}")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:  # type: ignore[override]  # frozen, so hashable (a plain dict is not)
        return hash(dataclasses.astuple(self))

    def hidden(self) -> dict[str, Any]:
        """The keys of other schedulers this config carries (from a swap), written on save."""
        return {k: v for k, v in self.__dict__.get("_extra", {}).items() if not k.startswith("_")}

    def to_json_dict(self) -> dict[str, Any]:
        """The ``scheduler_config.json`` content: metadata, fields in declaration order, then carried keys."""
        out: dict[str, Any] = {"_class_name": self._class_name, "_diffusers_version": DIFFUSERS_VERSION}
        out.update({name: _thaw(getattr(self, name)) for name in _field_names(type(self))})
        out.update({k: _thaw(v) for k, v in self.hidden().items()})
        return out


def _rebuild(cls: type[SchedulerConfig], fields: dict[str, Any], extra: dict[str, Any]) -> SchedulerConfig:
    config = cls(**fields)
    object.__setattr__(config, "_extra", extra)
    config._sync()
    return config


def with_metadata(config: SchedulerConfig, given: set[str], hidden: Mapping[str, Any]) -> SchedulerConfig:
    """``config`` carrying ``hidden`` keys of other schedulers and, as ``_use_default_values``, the fields not in
    ``given`` (diffusers' record of what the user never chose). Returns the same object."""
    extra: dict[str, Any] = {k: _freeze(v) for k, v in hidden.items()}
    defaulted = [name for name in _field_names(type(config)) if name not in given]
    if defaulted:
        extra["_use_default_values"] = defaulted
    object.__setattr__(config, "_extra", extra)
    config._sync()
    return config


# ---------------------------------------------------------------------------------------------- the six configs

@dataclass(frozen=True, eq=False)
class _ThresholdingConfig(SchedulerConfig):
    """Dynamic thresholding of x̂_0 (Saharia et al. 2022) and the zero-terminal-SNR rescale (Lin et al. 2023)."""
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_flags(self, "thresholding", "rescale_betas_zero_snr")
        _check_thresholding(self)


@dataclass(frozen=True, eq=False)
class DDPMSchedulerConfig(_ThresholdingConfig):
    _class_name = "DDPMScheduler"
    timestep_spacing: S.TimestepSpacing = "leading"
    variance_type: S.VarianceType = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("variance_type", self.variance_type, S.VARIANCE_TYPES)
        _check_clip(self)


@dataclass(frozen=True, eq=False)
class DDIMSchedulerConfig(_ThresholdingConfig):
    _class_name = "DDIMScheduler"
    timestep_spacing: S.TimestepSpacing = "leading"
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_flags(self, "set_alpha_to_one")
        _check_clip(self)


@dataclass(frozen=True, eq=False)
class _SigmaConfig(_ThresholdingConfig):
    """What the σ-based multistep solvers share: their order, the noise-level spacing and the final σ."""
    solver_order: int = 2
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: FinalSigmas = "zero"
    use_dynamic_shifting: bool = False
    time_shift_type: Literal["exponential"] = "exponential"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("solver_order", self.solver_order, minimum=1)
        if self.solver_order > 3:
            raise ValueError(f"solver_order={self.solver_order} is not supported; choose 1, 2 or 3")
        _check_flags(self, "lower_order_final")
        _check_sigma_spacing(self)
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS)
        _unsupported(self, "use_flow_sigmas", "flow matching models")
        _unsupported(self, "use_dynamic_shifting", "flow matching models")
        check_choice("time_shift_type", self.time_shift_type, ("exponential",))
        if check_number("flow_shift", self.flow_shift) <= 0:
            raise ValueError(f"flow_shift={self.flow_shift} must be positive")


@dataclass(frozen=True, eq=False)
class DPMSolverMultistepSchedulerConfig(_SigmaConfig):
    _class_name = "DPMSolverMultistepScheduler"
    algorithm_type: V.DPMAlgorithm = "dpmsolver++"
    solver_type: V.DPMSolverType = "midpoint"
    euler_at_final: bool = False
    use_lu_lambdas: bool = False
    lambda_min_clipped: float = -float("inf")
    # None or a DDPM variance type: the model predicts only the mean; "learned"/"learned_range": 2C output channels
    variance_type: S.VarianceType | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("algorithm_type", self.algorithm_type, V.DPM_ALGORITHMS)
        check_choice("solver_type", self.solver_type, V.DPM_SOLVER_TYPES)
        _check_flags(self, "euler_at_final", "use_lu_lambdas")
        if self.use_lu_lambdas and (self.use_karras_sigmas or self.use_exponential_sigmas):
            raise ValueError("use_lu_lambdas=True cannot be combined with use_karras_sigmas or use_exponential_sigmas")
        if not isinstance(self.lambda_min_clipped, (int, float)) or isinstance(self.lambda_min_clipped, bool):
            raise TypeError(f"lambda_min_clipped={self.lambda_min_clipped!r} must be a number")
        if self.variance_type is not None:
            check_choice("variance_type", self.variance_type, S.VARIANCE_TYPES)
        if self.algorithm_type in ("dpmsolver", "sde-dpmsolver") and self.final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' is not supported with algorithm_type={self.algorithm_type!r} "
                             f"(its noise-prediction step divides by σ = 0); use final_sigmas_type='sigma_min'")
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver' has no third-order step; use solver_order 1 or 2")


@dataclass(frozen=True, eq=False)
class UniPCMultistepSchedulerConfig(_SigmaConfig):
    _class_name = "UniPCMultistepScheduler"
    predict_x0: bool = True
    solver_type: V.UniPCSolverType = "bh2"
    disable_corrector: tuple[int, ...] = ()
    solver_p: None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.disable_corrector, list):
            object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))
        super().__post_init__()
        _check_flags(self, "predict_x0")
        check_choice("solver_type", self.solver_type, V.UNIPC_SOLVER_TYPES)
        if not isinstance(self.disable_corrector, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.disable_corrector):
            raise TypeError(f"disable_corrector={self.disable_corrector!r} must be a list of step indices")
        if self.solver_p is not None:
            raise ValueError("solver_p (another scheduler as UniPC's predictor) is not supported; leave it None")
        if self.shift_terminal is not None:
            raise ValueError("shift_terminal is only for flow matching models, which ddpm does not support")
        _check_sigma_bounds(self)
        if not self.predict_x0 and self.final_sigmas_type == "zero":
            raise ValueError("predict_x0=False with final_sigmas_type='zero' is not supported (the noise-prediction "
                             "step to σ = 0 multiplies 0 by ∞); use final_sigmas_type='sigma_min'")
        if self.thresholding and not self.predict_x0:
            raise ValueError("thresholding=True needs predict_x0=True (it clips the data prediction)")


@dataclass(frozen=True, eq=False)
class EulerDiscreteSchedulerConfig(SchedulerConfig):
    _class_name = "EulerDiscreteScheduler"
    interpolation_type: Literal["linear", "log_linear"] = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: Literal["discrete", "continuous"] = "discrete"
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: FinalSigmas = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("interpolation_type", self.interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_type", self.timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS)
        _check_flags(self, "rescale_betas_zero_snr")
        _check_sigma_spacing(self)
        _check_sigma_bounds(self)


@dataclass(frozen=True, eq=False)
class HeunDiscreteSchedulerConfig(SchedulerConfig):
    _class_name = "HeunDiscreteScheduler"
    beta_schedules = S.BETA_SCHEDULES + ("exp",)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sigma_spacing(self)
        _check_clip(self)


CONFIGS: dict[str, type[SchedulerConfig]] = {c._class_name: c for c in (
    DDPMSchedulerConfig, DDIMSchedulerConfig, DPMSolverMultistepSchedulerConfig, UniPCMultistepSchedulerConfig,
    EulerDiscreteSchedulerConfig, HeunDiscreteSchedulerConfig)}
AnyConfig = Union[DDPMSchedulerConfig, DDIMSchedulerConfig, DPMSolverMultistepSchedulerConfig,
                  UniPCMultistepSchedulerConfig, EulerDiscreteSchedulerConfig, HeunDiscreteSchedulerConfig]
# Every key some scheduler of the family takes, and which scheduler(s) take it (for error messages)
FAMILY_KEYS: dict[str, list[str]] = {}
for _name, _cls in CONFIGS.items():
    for _key in _field_names(_cls):
        FAMILY_KEYS.setdefault(_key, []).append(_name)


# ---------------------------------------------------------------------------------------------- swapping

def swap_in(config_class: type[SchedulerConfig], source: Mapping[str, Any],
            overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config of any scheduler of the family (ours, diffusers' FrozenDict, or a JSON dict) into the keyword
    arguments of ``config_class``'s scheduler and the keys to carry aside for the others (see the module doc).
    ``overrides`` win and must be keys of ``config_class``."""
    fields = set(_field_names(config_class))
    name = config_class._class_name
    defaulted = set(source.get("_use_default_values") or ())
    kwargs: dict[str, Any] = {}
    carried: dict[str, Any] = {}
    for key, value in source.items():
        if key.startswith("_") or key in LEGACY_KEYS or key in defaulted:
            continue
        if key in fields:
            kwargs[key] = value
        elif key in FAMILY_KEYS:
            carried[key] = value
        else:
            raise ValueError(f"unknown config key {key!r} for {name}: no scheduler of ddpm takes it (known keys: "
                             f"{', '.join(sorted(fields))})")
    if carried:
        logger.debug("%s: keeping the keys of other schedulers aside: %s", name, sorted(carried))
    if config_class is DDPMSchedulerConfig and kwargs.get("variance_type", "") is None:
        del kwargs["variance_type"]  # DPM-Solver's None (no variance channels) is DDPM's default, fixed_small
    for key, foreign in (("solver_type", FOREIGN_SOLVER_TYPES), ("algorithm_type", FOREIGN_ALGORITHM_TYPES)):
        allowed = _choices(config_class, key)
        if key in kwargs and kwargs[key] not in allowed and kwargs[key] in foreign:
            logger.debug("%s: %s=%r belongs to another solver; using the default", name, key, kwargs[key])
            del kwargs[key]
    for key, value in overrides.items():
        if key not in fields:
            owners = FAMILY_KEYS.get(key)
            raise ValueError(f"{name} has no config key {key!r}" + (f" (it is a key of {', '.join(owners)})"
                                                                     if owners else ""))
        kwargs[key] = value
    return kwargs, carried


def _choices(config_class: type[SchedulerConfig], key: str) -> tuple[Any, ...]:
    # The values ``key`` may take in ``config_class`` (only needed for the two solver keys)
    if key == "solver_type":
        return V.UNIPC_SOLVER_TYPES if config_class is UniPCMultistepSchedulerConfig else V.DPM_SOLVER_TYPES
    return V.DPM_ALGORITHMS


def betas_tuple(trained_betas: Any) -> tuple[float, ...] | None:
    """A list, array or tensor of β_t as the config's tuple of Python floats (values are checked by the config)."""
    if trained_betas is None:
        return None
    if isinstance(trained_betas, torch.Tensor):
        trained_betas = trained_betas.detach().cpu().double().numpy()
    try:
        betas = np.asarray(trained_betas)
    except ValueError:  # ragged nested lists
        betas = np.asarray(None)
    if betas.ndim != 1 or betas.dtype.kind not in "iuf":
        raise TypeError(f"trained_betas must be a 1-D list, array or tensor of numbers, got "
                        f"{type(trained_betas).__name__} with shape {betas.shape} and dtype {betas.dtype}")
    return tuple(float(b) for b in betas)


# ---------------------------------------------------------------------------------------------- validation

def _check_flags(c: SchedulerConfig, *keys: str) -> None:
    for key in keys:
        if not isinstance(getattr(c, key), bool):
            raise TypeError(f"{key}={getattr(c, key)!r} must be True or False")


def _unsupported(c: SchedulerConfig, key: str, what: str) -> None:
    if getattr(c, key):
        raise ValueError(f"{key}=True is for {what}, which ddpm does not support")


def _check_schedule(c: SchedulerConfig) -> None:
    check_int("num_train_timesteps", c.num_train_timesteps, minimum=1)
    check_choice("beta_schedule", c.beta_schedule, c.beta_schedules)
    check_choice("prediction_type", c.prediction_type, S.PREDICTION_TYPES)
    check_choice("timestep_spacing", c.timestep_spacing, S.TIMESTEP_SPACINGS)
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
    elif c.beta_schedule not in ("squaredcos_cap_v2", "exp"):  # those two do not use beta_start/beta_end
        if not 0 < start <= end < 1 or np.float32(1) - np.float32(start) == 1:
            raise ValueError(f"beta_start={start} and beta_end={end} must satisfy 0 < beta_start <= beta_end < 1 "
                             f"(and beta_start >= 1e-7: 1 - beta_start must differ from 1 in float32)")
    if getattr(c, "rescale_betas_zero_snr", False) and c.num_train_timesteps < 2:  # Lin et al. 2023: needs two
        raise ValueError(f"rescale_betas_zero_snr=True needs num_train_timesteps >= 2, got {c.num_train_timesteps}")
    check_int("steps_offset", c.steps_offset, minimum=0)
    if c.steps_offset >= c.num_train_timesteps:
        raise ValueError(f"steps_offset={c.steps_offset} must be less than num_train_timesteps="
                         f"{c.num_train_timesteps}")


def _check_thresholding(c: _ThresholdingConfig) -> None:
    if not 0 <= check_number("dynamic_thresholding_ratio", c.dynamic_thresholding_ratio) <= 1:  # a quantile
        raise ValueError(f"dynamic_thresholding_ratio={c.dynamic_thresholding_ratio!r} must be in [0, 1]")
    if check_number("sample_max_value", c.sample_max_value) <= 0:
        raise ValueError(f"sample_max_value={c.sample_max_value} must be positive")


def _check_clip(c: DDPMSchedulerConfig | DDIMSchedulerConfig | HeunDiscreteSchedulerConfig) -> None:
    _check_flags(c, "clip_sample")
    if check_number("clip_sample_range", c.clip_sample_range) <= 0:
        raise ValueError(f"clip_sample_range={c.clip_sample_range} must be positive")


def _check_sigma_spacing(c: Any) -> None:
    _check_flags(c, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    if c.use_beta_sigmas:
        raise ValueError("use_beta_sigmas=True needs scipy's beta distribution, which ddpm does not use; choose "
                         "use_karras_sigmas or use_exponential_sigmas")
    if c.use_karras_sigmas and c.use_exponential_sigmas:
        raise ValueError("only one of use_karras_sigmas and use_exponential_sigmas can be True")


def _check_sigma_bounds(c: UniPCMultistepSchedulerConfig | EulerDiscreteSchedulerConfig) -> None:
    for key in ("sigma_min", "sigma_max"):
        value = getattr(c, key)
        if value is not None and check_number(key, value) <= 0:
            raise ValueError(f"{key}={value} must be positive")


def check_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    """``num_inference_steps`` if it is an int in [1, num_train_timesteps], else a ValueError naming it."""
    check_int("num_inference_steps", num_inference_steps, minimum=1)
    if num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps="
                         f"{num_train_timesteps}]")
    return int(num_inference_steps)


def check_custom(values: Sequence[Any] | None, name: str) -> list[float] | None:
    """A non-empty list of numbers (custom timesteps or sigmas), or None."""
    if values is None:
        return None
    if hasattr(values, "tolist"):
        values = values.tolist()
    out = [float(check_number(f"{name}[{i}]", v if not isinstance(v, np.generic) else v.item()))
           for i, v in enumerate(values)]
    if not out:
        raise ValueError(f"{name} is empty")
    return out
