"""The diffusers surface of all six schedulers, run as the same user code against diffusers 0.42.1 and ddpm:
constructor signatures, configs as read-only mappings, save_config/load_config/from_pretrained both ways,
from_config swaps across the family (defaults, carried keys, foreign solver types), outputs, errors."""

import dataclasses
import inspect
import json
import logging
import math

import diffusers
import pytest
import torch

import ddpm
from ddpm.schedulers import SCHEDULERS, DDIMScheduler, DDPMScheduler, SchedulerOutput, draw_noise

NAMES = list(SCHEDULERS)
SHAPE = (2, 3, 4, 4)
# a non-default config each scheduler of both libraries takes
CUSTOM = {"num_train_timesteps": 200, "beta_schedule": "scaled_linear", "beta_start": 0.001, "beta_end": 0.015,
          "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
EXTRA = {"DDPMScheduler": {"variance_type": "fixed_large", "clip_sample": False},
         "DDIMScheduler": {"set_alpha_to_one": False, "clip_sample": False},
         "DPMSolverMultistepScheduler": {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
         "UniPCMultistepScheduler": {"solver_type": "bh1", "disable_corrector": [0], "final_sigmas_type": "sigma_min"},
         "EulerDiscreteScheduler": {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
         "HeunDiscreteScheduler": {"clip_sample": True, "use_karras_sigmas": True}}


def plain(value):
    """JSON-like form of a config value (our tuples are diffusers' lists)."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def as_dict(config, drop=("_use_default_values",)):
    return {k: plain(v) for k, v in dict(config).items() if k not in drop}


def both(name, **kw):
    return getattr(ddpm, name)(**kw), getattr(diffusers, name)(**kw)


def test_import_paths_and_the_class_table():
    # `from ddpm import X` and `from ddpm.schedulers import X` are the same classes; SCHEDULERS maps diffusers'
    # class names (a saved config's _class_name) to them
    assert NAMES == ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                     "EulerDiscreteScheduler", "HeunDiscreteScheduler"]
    for name, cls in SCHEDULERS.items():
        assert getattr(ddpm, name) is cls and cls.__name__ == name and hasattr(diffusers, name)
    assert (DDPMScheduler, DDIMScheduler) == (ddpm.DDPMScheduler, ddpm.DDIMScheduler)
    noise = draw_noise((2, 3, 4, 4), [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
                       torch.device("cpu"), torch.float32)
    torch.testing.assert_close(noise[1:], torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", NAMES)
def test_signatures_match_diffusers(name):
    def params(fn, skip=()):
        return [(p.name, plain(p.default)) for p in inspect.signature(fn).parameters.values()
                if p.kind != p.VAR_KEYWORD and p.name not in skip]

    ours, theirs = getattr(ddpm, name), getattr(diffusers, name)
    # every config key with diffusers' default; our constructors also take diffusers' metadata keys (`_class_name`
    # ...) through **metadata, so that Scheduler(**scheduler.config) works
    assert params(ours.__init__) == params(theirs.__init__)
    # every step argument of diffusers', same defaults; UniPC and Heun add `generator` (unused) so that every
    # scheduler steps with one signature
    step = params(ours.step, skip=("generator",) if name in ("UniPCMultistepScheduler", "HeunDiscreteScheduler") else ())
    assert step == params(theirs.step)
    # set_timesteps: diffusers' arguments, except flow matching's `mu` and UniPC's flow-only `sigmas`; DDIM adds
    # `timesteps` (custom timesteps, as DDPM has)
    ours_st = [p for p, _ in params(ours.set_timesteps, skip=("timesteps",) if name == "DDIMScheduler" else ())]
    theirs_st = params(theirs.set_timesteps, skip=("mu", "sigmas") if name != "EulerDiscreteScheduler" else ("mu",))
    assert ours_st == [p for p, _ in theirs_st]  # (DDIM's num_inference_steps is required there, optional here)
    assert ours.config_name == theirs.config_name == "scheduler_config.json"
    assert ours.order == theirs.order


@pytest.mark.parametrize("name", NAMES)
def test_config_is_a_read_only_mapping_like_diffusers_frozendict(name, tmp_path):
    kw = {**CUSTOM, **EXTRA[name]}
    ours, theirs = both(name, **kw)
    # the lines of issue 11, as a user writes them
    assert dict(ours.config)["prediction_type"] == ours.config["prediction_type"] == ours.config.prediction_type
    assert as_dict(ours.config, drop=("_use_default_values", "_class_name", "_diffusers_version")) == \
        as_dict(theirs.config, drop=("_use_default_values", "_class_name", "_diffusers_version"))
    # what the user did not choose, recorded as diffusers records it
    assert set(ours.config["_use_default_values"]) == set(theirs.config["_use_default_values"])
    assert "prediction_type" in ours.config and len(ours.config) == len(list(ours.config.keys()))
    again = getattr(ddpm, name)(**ours.config)  # **config: the metadata keys are accepted and recomputed
    assert dataclasses.astuple(again.config) == dataclasses.astuple(ours.config)
    for write in (lambda c: c.__setitem__("prediction_type", "epsilon"), lambda c: setattr(c, "prediction_type", "x")):
        with pytest.raises((TypeError, dataclasses.FrozenInstanceError)):
            write(ours.config)
    # loaded from the same file, the mappings are equal key for key, metadata included
    theirs.save_config(tmp_path)
    loaded_ours, loaded_theirs = getattr(ddpm, name).from_pretrained(tmp_path), getattr(diffusers, name).from_pretrained(tmp_path)
    assert as_dict(loaded_ours.config) == as_dict(loaded_theirs.config)
    assert loaded_ours.config == dict(loaded_ours.config)  # equality of mappings, as FrozenDict == dict


@pytest.mark.parametrize("name", NAMES)
def test_save_config_and_load_config_both_directions(name, tmp_path):
    kw = {**CUSTOM, **EXTRA[name]}
    ours, theirs = both(name, **kw)
    ours.save_config(tmp_path / "ours")
    theirs.save_config(tmp_path / "theirs")
    # the same file content (diffusers sorts its keys; the values and metadata agree)
    ours_file = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    theirs_file = json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())
    assert ours_file == theirs_file
    # load_config: diffusers' signature and return values
    for lib in (ddpm, diffusers):
        cls = getattr(lib, name)
        assert cls.load_config(tmp_path / "ours") == theirs_file
        config, unused, commit = cls.load_config(tmp_path / "ours", return_unused_kwargs=True, return_commit_hash=True)
        assert config == theirs_file and unused == {} and commit is None
    # each library loads the other's folder into the same scheduler
    from_theirs = getattr(ddpm, name).from_pretrained(tmp_path / "theirs")
    from_ours = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    assert as_dict(from_theirs.config) == as_dict(from_ours.config)
    for s in (from_theirs, from_ours):
        s.set_timesteps(5)
    torch.testing.assert_close(from_theirs.sigmas if hasattr(from_ours, "sigmas") and name not in ("DDPMScheduler", "DDIMScheduler")
                               else from_theirs.alphas_cumprod,
                               from_ours.sigmas if name not in ("DDPMScheduler", "DDIMScheduler") else from_ours.alphas_cumprod)
    assert torch.equal(from_theirs.timesteps, from_ours.timesteps)


@pytest.mark.parametrize("target", NAMES)
@pytest.mark.parametrize("source", NAMES)
def test_from_config_swaps_across_the_family_as_diffusers(source, target, tmp_path):
    # constructed in code (keys the user never chose take the new scheduler's defaults) and loaded from a file
    # (every key chosen); the swap keeps other schedulers' keys aside so that swapping back restores them
    kw = {**CUSTOM, **EXTRA[source]}
    ours_src, theirs_src = both(source, **kw)
    theirs_src.save_config(tmp_path)
    for ours_cfg, theirs_cfg in [(ours_src.config, theirs_src.config),
                                 (getattr(ddpm, source).load_config(tmp_path), getattr(diffusers, source).load_config(tmp_path))]:
        ours = getattr(ddpm, target).from_config(ours_cfg)
        theirs = getattr(diffusers, target).from_config(theirs_cfg)
        fields = [f.name for f in dataclasses.fields(ours.config)]
        theirs_fields = {k: plain(theirs.config[k]) for k in fields}
        if theirs_fields.get("variance_type", "") is None and target == "DDPMScheduler":
            theirs_fields["variance_type"] = "fixed_small"  # diffusers' DDPM reads None as fixed_small; we write it
        assert {k: plain(ours.config[k]) for k in fields} == theirs_fields
        carried = {k: plain(v) for k, v in ours.config.hidden().items()}
        theirs_carried = {k: plain(v) for k, v in theirs.config.items() if not k.startswith("_") and k not in fields}
        assert carried == theirs_carried
        back, their_back = getattr(ddpm, source).from_config(ours.config), getattr(diffusers, source).from_config(theirs.config)
        assert {k: plain(back.config[k]) for k in kw} == {k: plain(their_back.config[k]) for k in kw}
        if not {"solver_type", "algorithm_type"} & set(kw):  # those may have fallen back to the other's default
            assert {k: plain(back.config[k]) for k in kw} == {k: plain(ours_src.config[k]) for k in kw}
        # our config in diffusers' from_config (which takes only a real dict), and diffusers' in ours, give the
        # same scheduler
        assert as_dict(getattr(diffusers, target).from_config(dict(ours.config)).config) \
            .items() >= {k: plain(ours.config[k]) for k in fields}.items()
        assert dataclasses.astuple(getattr(ddpm, target).from_config(theirs.config).config) == \
            dataclasses.astuple(ours.config)


@pytest.mark.parametrize("target", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                                    "HeunDiscreteScheduler", "DDIMScheduler"])
def test_a_swapped_scheduler_samples_as_diffusers_swapped_one(target, tmp_path):
    # the everyday swap: a trained DDPM pipeline's scheduler folder, then Target.from_config(pipe.scheduler.config)
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_pretrained(tmp_path)
    schedulers = [getattr(lib, target).from_config(lib.DDPMScheduler.from_pretrained(tmp_path).config)
                  for lib in (ddpm, diffusers)]
    outs = []
    for s in schedulers:
        s.set_timesteps(8)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * float(s.init_noise_sigma)
        for t in s.timesteps:
            out = 0.6 * s.scale_model_input(x, t) + 0.1 * math.sin(float(t) / 7)
            x = s.step(out, t, x, **({"generator": g} if "generator" in inspect.signature(s.step).parameters else {})
                       ).prev_sample
        outs.append(x)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_unknown_and_foreign_keys(caplog):
    # a key no scheduler knows is an error naming it; another scheduler's key is kept aside and logged at debug
    with pytest.raises(ValueError, match="skip_prk_steps"):
        ddpm.DPMSolverMultistepScheduler.from_config({"num_train_timesteps": 10, "skip_prk_steps": True})
    with pytest.raises(ValueError, match="variance_type.*DDPMScheduler"):
        ddpm.EulerDiscreteScheduler.from_config({}, variance_type="fixed_large")  # an override must be our own key
    with caplog.at_level(logging.DEBUG, logger="ddpm.schedulers.config"):
        s = ddpm.EulerDiscreteScheduler.from_config({"variance_type": "fixed_large", "solver_type": "bh2"})
    assert s.config.hidden() == {"variance_type": "fixed_large", "solver_type": "bh2"}
    assert "variance_type" in caplog.text
    # a solver_type only another solver has falls back to this one's default, as in diffusers' constructors
    for lib in (ddpm, diffusers):
        assert lib.UniPCMultistepScheduler.from_config({"solver_type": "midpoint"}).config.solver_type == "bh2"
    deis = {"solver_type": "logrho", "algorithm_type": "deis", "final_sigmas_type": "sigma_min"}  # DEIS's keys
    for lib in (ddpm, diffusers):
        config = lib.DPMSolverMultistepScheduler.from_config(deis).config
        assert (config.algorithm_type, config.solver_type) == ("dpmsolver++", "midpoint")
    with pytest.raises(ValueError, match="solver_type"):  # in a constructor, a wrong value is still an error
        ddpm.UniPCMultistepScheduler(solver_type="midpoint")
    with pytest.raises(TypeError, match="from_pretrained"):
        ddpm.DDPMScheduler.from_config("google/ddpm-cifar10-32")
    with pytest.raises(TypeError, match="bogus"):
        ddpm.DDPMScheduler(bogus=1)


@pytest.mark.parametrize("kw,word", [
    ({"use_beta_sigmas": True}, "use_beta_sigmas"), ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"), ({"solver_order": 4}, "solver_order"),
    ({"algorithm_type": "dpmsolver"}, "final_sigmas_type"), ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"algorithm_type": "sde-dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}, "third-order"),
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one"),
    ({"use_karras_sigmas": True, "use_lu_lambdas": True}, "use_lu_lambdas"), ({"variance_type": "other"}, "variance_type")])
def test_values_dpm_solver_cannot_run_are_errors_naming_the_key(kw, word):
    with pytest.raises(ValueError, match=word):
        ddpm.DPMSolverMultistepScheduler(**kw)


def test_values_the_other_solvers_cannot_run_are_errors_naming_the_key():
    for cls, kw, word in [(ddpm.UniPCMultistepScheduler, {"predict_x0": False}, "final_sigmas_type"),
                          (ddpm.UniPCMultistepScheduler, {"solver_p": ddpm.DDPMScheduler()}, "solver_p"),
                          (ddpm.UniPCMultistepScheduler, {"thresholding": True, "predict_x0": False,
                                                          "final_sigmas_type": "sigma_min"}, "predict_x0"),
                          (ddpm.UniPCMultistepScheduler, {"sigma_min": -1.0}, "sigma_min"),
                          (ddpm.EulerDiscreteScheduler, {"interpolation_type": "cubic"}, "interpolation_type"),
                          (ddpm.EulerDiscreteScheduler, {"timestep_spacing": "uniform"}, "timestep_spacing"),
                          (ddpm.HeunDiscreteScheduler, {"beta_schedule": "laplace"}, "beta_schedule"),
                          (ddpm.DDPMScheduler, {"beta_schedule": "exp"}, "beta_schedule"),
                          (ddpm.HeunDiscreteScheduler, {"num_train_timesteps": 10, "trained_betas": [0.1] * 5},
                           "trained_betas")]:
        with pytest.raises(ValueError, match=word):
            cls(**kw)
    with pytest.raises(TypeError, match="lower_order_final"):
        ddpm.DPMSolverMultistepScheduler(lower_order_final="yes")


@pytest.mark.parametrize("name", NAMES)
def test_outputs_attributes_and_state_errors(name):
    ours, theirs = both(name)
    assert ours.default_num_inference_steps == {"DDPMScheduler": None, "DDIMScheduler": 50}.get(
        name, ours.default_num_inference_steps) and (ours.default_num_inference_steps is None or
                                                     1 <= ours.default_num_inference_steps <= 50)
    assert [c.__name__ for c in ours.compatibles] == NAMES
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma))
    if name in ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):  # as in diffusers, the
        # others can step before set_timesteps, on every training timestep
        with pytest.raises(ValueError, match="set_timesteps"):
            ours.step(torch.zeros(SHAPE), ours.timesteps[0], torch.zeros(SHAPE))
    for s in (ours, theirs):
        s.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = []
    for s in (ours, theirs):
        t = s.timesteps[0]
        kw = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(s.step).parameters else {}
        out = s.step(0.5 * s.scale_model_input(x, t), t, x, **kw)
        s.set_timesteps(4)
        kw = {"generator": torch.Generator().manual_seed(0)} if kw else {}
        plain_out = s.step(0.5 * s.scale_model_input(x, t), t, x, return_dict=False, **kw)
        results.append((out, plain_out))
    (out, plain_out), (their_out, their_plain) = results
    assert isinstance(out, SchedulerOutput) and type(plain_out) is tuple and len(plain_out) == len(their_plain)
    assert out.prev_sample is out["prev_sample"] is out[0] and len(out.to_tuple()) == len(their_out.to_tuple())
    torch.testing.assert_close(plain_out[0], their_plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prev_sample, plain_out[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.set_timesteps(ours.num_train_timesteps + 1)
    if name not in ("DDPMScheduler", "DDIMScheduler"):
        for _ in range(len(ours.timesteps) - 1):  # run to the end of the schedule: one more step is an error
            ours.step(torch.zeros(SHAPE), ours.timesteps[0], torch.zeros(SHAPE))
        with pytest.raises(ValueError, match="set_timesteps"):
            ours.step(torch.zeros(SHAPE), ours.timesteps[0], torch.zeros(SHAPE))


def test_euler_refuses_integer_timesteps_and_warns_without_scale_model_input(caplog):
    s = ddpm.EulerDiscreteScheduler()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="integer"):
        s.step(torch.zeros(SHAPE), 0, torch.zeros(SHAPE))
    with caplog.at_level(logging.WARNING):
        s.step(torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE))
    assert "scale_model_input" in caplog.text


def test_diffusers_deliberate_nan_cases_are_finite_here():
    # UniPC with solver_type="bh1" and its default final σ = 0: diffusers' last step computes −∞ · 0 = NaN
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    outs = []
    for lib in (ddpm, diffusers):
        s = lib.UniPCMultistepScheduler(solver_type="bh1")
        s.set_timesteps(6)
        y = x
        for t in s.timesteps:
            y = s.step(0.5 * y, t, y).prev_sample
        outs.append(y)
    assert torch.isnan(outs[1]).all() and torch.isfinite(outs[0]).all()
    # the last step to σ = 0 returns that step's data prediction m0 (σ_t/σ_s = 0, α_t h φ_1 = −1), made from the
    # model output at the uncorrected sample
    s = ddpm.UniPCMultistepScheduler(solver_type="bh1")
    s.set_timesteps(6)
    y = x
    for t in s.timesteps[:-1]:
        y = s.step(0.5 * y, t, y).prev_sample
    last = s.step(0.5 * y, s.timesteps[-1], y).prev_sample
    alpha, sigma = 1 / math.sqrt(float(s.sigmas[-2]) ** 2 + 1), float(s.sigmas[-2]) / math.sqrt(float(s.sigmas[-2]) ** 2 + 1)
    torch.testing.assert_close(last, (y - sigma * 0.5 * y) / alpha, rtol=1e-5, atol=1e-5)  # x̂_0 = (x − σ_t ε)/α_t
    # a repeated first timestep (cosine schedule with Karras σ): diffusers starts at the second σ and fails
    for cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        ours, theirs = both(cls, beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
        for s in (ours, theirs):
            s.set_timesteps(12)
        assert int(ours.timesteps[0]) == int(ours.timesteps[1])
        with pytest.raises((IndexError, AssertionError)):
            for t in theirs.timesteps:
                theirs.step(0.5 * x, t, x)
        y = x
        for t in ours.timesteps:
            y = ours.step(0.5 * y, t, y).prev_sample
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_multistep_solvers_at_every_train_timestep(cls):
    # As many steps as training timesteps: linspace's n + 1 points round two of them to one timestep (t = 6 here).
    # diffusers keeps the repeat and returns NaN (a step of h = 0); ours merges it and runs the 11 distinct steps,
    # as asked for 11.
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours, theirs = both(cls, num_train_timesteps=12)
    theirs.set_timesteps(12)
    y = x
    for t in theirs.timesteps:
        y = theirs.step(0.5 * y, t, y).prev_sample
    assert theirs.timesteps.tolist().count(6) == 2 and not torch.isfinite(y).all()
    outs = []
    for n in (12, 11):
        ours.set_timesteps(n)
        assert ours.timesteps.tolist() == list(range(11, 0, -1)) and ours.num_inference_steps == 11
        y = x
        for t in ours.timesteps:
            y = ours.step(0.5 * y, t, y).prev_sample
        outs.append(y)
    theirs.set_timesteps(11)
    y = x
    for t in theirs.timesteps:
        y = theirs.step(0.5 * y, t, y).prev_sample
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], y, rtol=1e-6, atol=1e-6)
    # leading spacing's stride 12 // 13 is 0 (diffusers: twelve steps at t = 0); ours strides 1 and gets 11..1 too
    ours, theirs = both(cls, num_train_timesteps=12, timestep_spacing="leading")
    theirs.set_timesteps(12)
    assert theirs.timesteps.tolist() == [0] * 12
    for n in (12, 11):
        ours.set_timesteps(n)
        assert ours.timesteps.tolist() == list(range(11, 0, -1))


def test_sampler_takes_only_the_training_schedule_from_the_config(tmp_path):
    # Built one after another, each from the previous sampler's config (as a script swapping samplers on one
    # pipeline does), every sampler is what diffusers builds from the saved schedule with that sampler's settings:
    # no order, algorithm or noise-level choice leaks from one to the next.
    from ddpm.schedulers import SAMPLERS, sampler

    DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2",
                  prediction_type="v_prediction").save_pretrained(tmp_path)
    config = DDPMScheduler.from_pretrained(tmp_path).config
    chain = [("dpm", {"solver_order": 3, "karras_sigmas": True}), ("sde-dpm", {}), ("unipc", {}), ("dpm", {}),
             ("euler", {}), ("heun", {"karras_sigmas": True}), ("ddim", {}), ("ddpm", {})]
    for name, flags in chain:
        ours = sampler(name, config, **flags)
        class_name, settings = SAMPLERS[name]
        settings = {**settings, **({"solver_order": flags["solver_order"]} if "solver_order" in flags else {}),
                    **({"use_karras_sigmas": True} if flags.get("karras_sigmas") else {})}
        theirs = getattr(diffusers, class_name).from_pretrained(tmp_path, **settings)
        assert type(ours).__name__ == class_name
        shared = [k for k in ours.config if not k.startswith("_") and k in theirs.config]
        assert len(shared) >= 10
        for key in shared:  # e.g. clip_sample=True from the saved DDPM config reaches DDIM and Heun, as in diffusers
            mine, other = ours.config[key], theirs.config[key]
            assert (list(mine) if isinstance(mine, tuple) else mine) == other, (name, key)
        ours.set_timesteps(7)
        theirs.set_timesteps(7)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist(), name
        config = ours.config
