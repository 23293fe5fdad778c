"""The diffusers code people already have, run against ddpm and against live diffusers: configs, outputs, the
diffusers names, and the Pipeline surface (components, to(), defaults, every scheduler, compiled UNets)."""

import inspect
import json

import diffusers
import numpy as np
import pytest
import torch

import ddpm
from ddpm import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, ImagePipelineOutput, Pipeline, UNet
from ddpm import UNet2DModel
from ddpm.pipeline import SCHEDULERS

TINY = dict(sample_size=8, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
NP = dict(output_type="np")


@pytest.fixture
def folder(tmp_path):
    """A diffusers DDPMPipeline folder with seeded random weights (DDPM, 50 training steps)."""
    torch.manual_seed(0)
    pipe = diffusers.DDPMPipeline(diffusers.UNet2DModel(**TINY), diffusers.DDPMScheduler(num_train_timesteps=50))
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def load_both(folder, ours_cls=DDPMPipeline, theirs_cls=diffusers.DDPMPipeline):
    theirs, ours = theirs_cls.from_pretrained(folder), ours_cls.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


def plain(config):
    """A config as a plain dict of JSON values, without diffusers' private ``_`` keys (lists, not tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def assert_same_entries(ours, theirs):
    """Every key of our config has diffusers' value. (diffusers' DDIMScheduler.from_config(a DDPM config) keeps
    DDPM's variance_type as a key it never uses; ours drops it.)"""
    ours, theirs = plain(ours), plain(theirs)
    assert ours == {k: theirs[k] for k in ours}
    assert set(theirs) - set(ours) <= {"variance_type"}


def images(pipe, seed=0, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(seed), **{**NP, **kwargs}).images


def test_issue_11_lines_run_as_written(folder, tmp_path):
    """The lines at the top of issue 11, with ``diffusers`` replaced by ``ddpm`` in the imports."""
    from ddpm import DDIMPipeline, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel

    pipe = DDPMPipeline.from_pretrained(folder)
    p, d = folder / "unet", tmp_path / "saved"
    unet = pipe.unet
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])

    config = dict(pipe.scheduler.config)
    prediction_type = pipe.scheduler.config["prediction_type"]
    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.save_config(tmp_path / "scheduler_copy")
    ddim = DDIMPipeline(**pipe.components)
    half = UNet2DModel.from_pretrained(p, low_cpu_mem_usage=False, torch_dtype=torch.float16)
    pipe.save_pretrained(d, safe_serialization=True)
    out = unet(x, t); out["sample"]; out.to_tuple()  # noqa: E702

    # and they mean what they mean in diffusers
    theirs = diffusers.DDPMPipeline.from_pretrained(folder)
    assert plain(config) == plain(theirs.scheduler.config)
    assert prediction_type == theirs.scheduler.config["prediction_type"] == "epsilon"
    theirs_dpm = diffusers.DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    assert_same_entries(dpm.config, theirs_dpm.config)
    assert plain(diffusers.DDPMScheduler.load_config(tmp_path / "scheduler_copy")) == plain(theirs.scheduler.config)
    assert isinstance(ddim.scheduler, DDIMScheduler)
    assert_same_entries(ddim.scheduler.config, diffusers.DDIMPipeline(**theirs.components).scheduler.config)
    assert half.dtype == torch.float16 == diffusers.UNet2DModel.from_pretrained(
        p, low_cpu_mem_usage=False, torch_dtype=torch.float16).dtype
    assert type(diffusers.DDPMPipeline.from_pretrained(d).scheduler).__name__ == "DDPMScheduler"
    theirs_out = theirs.unet(x, t)
    torch.testing.assert_close(out["sample"], theirs_out["sample"], rtol=1e-4, atol=1e-5)
    assert len(out.to_tuple()) == len(theirs_out.to_tuple()) == 1


# ---- configs -------------------------------------------------------------------------------------------------

def test_config_reads_like_diffusers_frozendict(folder):
    ours, theirs = UNet.from_pretrained(folder / "unet"), diffusers.UNet2DModel.from_pretrained(folder / "unet")
    for config, other in ((ours.config, theirs.config), (DDPMScheduler.from_pretrained(folder / "scheduler").config,
                                                        diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").config)):
        assert plain(config) == plain(other)
        assert isinstance(config, dict) and isinstance(other, dict)
        assert {k for k in config.keys() if not k.startswith("_")} == {k for k in other.keys() if not k.startswith("_")}
        assert list(config.values()) == [config[k] for k in config] and len(config) == len(list(config.items()))
        assert ("in_channels" in config) == ("in_channels" in other)
        assert plain(json.loads(json.dumps(config))) == plain(other)
        assert (lambda **kw: sorted(kw))(**config) == sorted(config)
        for write in (lambda c: c.pop("x"), lambda c: c.update(x=1), lambda c: c.setdefault("x", 1),
                      lambda c: c.__delitem__("x")):
            with pytest.raises(TypeError, match="frozen"):
                write(config)
            with pytest.raises(Exception):  # noqa: B017 - diffusers raises a bare Exception
                write(other)
        with pytest.raises(TypeError, match="frozen: cannot set 'x'"):
            config["x"] = 1  # diffusers' FrozenDict lets this one through (docs/parity.md)
        with pytest.raises(Exception):  # noqa: B017 - a FrozenInstanceError here
            config.sample_size = 3
    assert ours.config.sample_size == ours.config["sample_size"] == theirs.config.sample_size


@pytest.mark.parametrize("form", ["dict", "diffusers FrozenDict", "ours", "json file dict"])
def test_from_config_every_form_with_overrides(folder, form):
    theirs = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    config = {"dict": dict(theirs.config), "diffusers FrozenDict": theirs.config,
              "ours": UNet.from_pretrained(folder / "unet").config,
              "json file dict": UNet.load_config(folder / "unet")}[form]
    ours = UNet.from_config(config, sample_size=16, dropout=0.1)
    expected = diffusers.UNet2DModel.from_config(config, sample_size=16, dropout=0.1)
    assert plain(ours.config) == plain(expected.config)
    assert ours.config.sample_size == 16 and ours.config.dropout == 0.1
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in expected.named_parameters()]


def test_load_config_save_config_and_config_name(folder, tmp_path):
    assert UNet.config_name == diffusers.UNet2DModel.config_name == "config.json"
    assert UNet.load_config(folder / "unet") == diffusers.UNet2DModel.load_config(folder / "unet")
    assert UNet.load_config(folder, subfolder="unet") == UNet.load_config(folder / "unet")
    ours = UNet.from_config(UNet.load_config(folder / "unet"))
    ours.save_config(tmp_path / "cfg")
    assert [p.name for p in (tmp_path / "cfg").iterdir()] == ["config.json"]
    back = diffusers.UNet2DModel.from_config(diffusers.UNet2DModel.load_config(tmp_path / "cfg"))
    assert plain(back.config) == plain(ours.config)
    assert diffusers.UNet2DModel.load_config(tmp_path / "cfg")["_class_name"] == "UNet2DModel"


def test_from_config_errors(folder):
    config = UNet.load_config(folder / "unet")
    with pytest.raises(ValueError, match="cross_attention_dim"):
        UNet.from_config({**config, "cross_attention_dim": 8})
    with pytest.raises(ValueError, match="cross_attention_dim"):
        UNet.from_config(config, cross_attention_dim=8)
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        UNet.from_config({**config, "_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError, match="block_out_channels"):
        UNet.from_config(config, block_out_channels=(4, 8, 16))
    with pytest.raises(TypeError, match="UNetConfig, a dict or a folder"):
        UNet.from_config(42)


# ---- outputs -------------------------------------------------------------------------------------------------

def test_outputs_behave_like_diffusers_baseoutput(folder):
    theirs, ours = load_both(folder)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for lib, pipe in (("diffusers", theirs), ("ddpm", ours)):
        out = pipe.unet(x, 10)
        assert list(out.keys()) == ["sample"] and out[0] is out["sample"] is out.sample, lib
        (sample,) = pipe.unet(x, 10, return_dict=False)
        assert type(pipe.unet(x, 10, return_dict=False)) is tuple and sample.shape == x.shape, lib
        pipe.scheduler.set_timesteps(5)
        step = pipe.scheduler.step(out.sample, pipe.scheduler.timesteps[0], x, generator=torch.manual_seed(0))
        assert list(step.keys()) == ["prev_sample", "pred_original_sample"], lib
        assert step[0] is step.prev_sample and len(step.to_tuple()) == 2, lib
        raw = pipe.scheduler.step(out.sample, pipe.scheduler.timesteps[0], x, return_dict=False)
        assert type(raw) is tuple and len(raw) == 2, lib
        result = pipe(batch_size=1, num_inference_steps=2, output_type="np")
        assert list(result.keys()) == ["images"] and result[0] is result["images"] is result.images, lib
        assert type(pipe(num_inference_steps=2, output_type="np", return_dict=False)) is tuple, lib
    assert isinstance(ours(num_inference_steps=1), ImagePipelineOutput)


# ---- the diffusers names --------------------------------------------------------------------------------------

def test_diffusers_names_import_from_ddpm():
    assert ddpm.UNet2DModel is UNet2DModel is UNet
    assert issubclass(DDPMPipeline, Pipeline) and issubclass(DDIMPipeline, Pipeline)
    assert set(ddpm.__all__) >= {"UNet", "DDPMScheduler", "DDIMScheduler", "Pipeline", "UNet2DModel",
                                 "DDPMPipeline", "DDIMPipeline", "ImagePipelineOutput"}
    assert ddpm.__all__[:4] == ["UNet", "DDPMScheduler", "DDIMScheduler", "Pipeline"]  # documented first


@pytest.mark.parametrize("name", ["DDPMPipeline", "DDIMPipeline"])
def test_call_signatures_match_diffusers(name):
    ours = inspect.signature(getattr(ddpm, name).__call__).parameters
    theirs = inspect.signature(getattr(diffusers, name).__call__).parameters
    assert list(ours) == list(theirs)  # same names in the same order, so positional calls mean the same
    for key in theirs:
        if key != "num_inference_steps":  # ours: None = the scheduler's default (which is diffusers' number)
            assert ours[key].default == theirs[key].default, key


def test_ddim_pipeline_converts_its_scheduler_and_defaults_to_50_steps(folder):
    theirs, ours = load_both(folder, DDIMPipeline, diffusers.DDIMPipeline)
    assert type(ours.scheduler) is DDIMScheduler and type(theirs.scheduler).__name__ == "DDIMScheduler"
    assert_same_entries(ours.scheduler.config, theirs.scheduler.config)
    np.testing.assert_allclose(images(ours), images(theirs), atol=2e-5, rtol=0)  # 50 steps each
    assert len(ours.scheduler.timesteps) == len(theirs.scheduler.timesteps) == 50
    for eta, clipped in ((1.0, None), (0.5, True)):
        np.testing.assert_allclose(images(ours, 3, eta=eta, use_clipped_model_output=clipped, num_inference_steps=4),
                                   images(theirs, 3, eta=eta, use_clipped_model_output=clipped, num_inference_steps=4),
                                   atol=2e-5, rtol=0)
    ddpm_scheduler = DDPMScheduler(num_train_timesteps=50)
    built = DDIMPipeline(unet=ours.unet, scheduler=ddpm_scheduler)
    assert type(built.scheduler) is DDIMScheduler and built.scheduler is not ddpm_scheduler


def test_ddim_pipeline_folder_round_trip_with_diffusers(folder, tmp_path):
    _, ours = load_both(folder, DDIMPipeline, diffusers.DDIMPipeline)
    ours.save_pretrained(tmp_path / "ddim")
    index = json.loads((tmp_path / "ddim" / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    back = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ddim")
    back.set_progress_bar_config(disable=True)
    assert type(back).__name__ == "DDIMPipeline"
    np.testing.assert_allclose(images(back, num_inference_steps=5), images(ours, num_inference_steps=5),
                               atol=2e-5, rtol=0)


# ---- Pipeline surface -----------------------------------------------------------------------------------------

def test_components_and_rebuilding_from_them(folder):
    theirs, ours = load_both(folder)
    assert list(ours.components) == list(theirs.components) == ["unet", "scheduler"]
    assert ours.components["unet"] is ours.unet and ours.components["scheduler"] is ours.scheduler
    again = DDPMPipeline(**ours.components)
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(again, num_inference_steps=3), images(ours, num_inference_steps=3))


@pytest.mark.parametrize("call", ["cpu", "dtype", "cpu+dtype", "device=,dtype=", "dtype=", "torch_dtype="])
def test_to_forms(folder, call):
    theirs, ours = load_both(folder)
    forms = {"cpu": (("cpu",), {}), "dtype": ((torch.bfloat16,), {}), "cpu+dtype": (("cpu", torch.bfloat16), {}),
             "device=,dtype=": ((), {"device": "cpu", "dtype": torch.bfloat16}), "dtype=": ((), {"dtype": torch.bfloat16}),
             "torch_dtype=": ((), {"torch_dtype": torch.bfloat16, "torch_device": "cpu"})}
    args, kwargs = forms[call]
    assert ours.to(*args, **kwargs) is ours
    theirs.to(*args, **kwargs)
    expected = torch.float32 if call == "cpu" else torch.bfloat16
    assert ours.dtype == ours.unet.dtype == expected and ours.device == torch.device("cpu")
    # diffusers 0.42.1 silently ignores torch_dtype= and torch_device=; ours honours them (docs/parity.md)
    assert theirs.dtype == (torch.float32 if call == "torch_dtype=" else expected)


def test_to_errors(folder):
    _, ours = load_both(folder)
    with pytest.raises(TypeError, match="'dtypes'"):
        ours.to(dtypes=torch.float16)
    with pytest.raises(ValueError, match="given twice"):
        ours.to(torch.float16, dtype=torch.float16)
    with pytest.raises(ValueError, match="first argument is the device"):
        ours.to(torch.float16, "cpu")
    with pytest.raises(TypeError, match="floating-point"):
        ours.to(torch.int8)


def test_progress_bar_and_its_config(folder, capsys):
    _, ours = load_both(folder)
    ours.set_progress_bar_config(desc="denoising", disable=False)
    ours(num_inference_steps=3)
    assert "denoising" in capsys.readouterr().err
    assert list(ours.progress_bar(range(4))) == [0, 1, 2, 3]
    with ours.progress_bar(total=2) as bar:
        bar.update(2)
    assert "2/2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="iterable or a total"):
        ours.progress_bar()


def count_unet_calls(pipe):
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_default_steps_follow_the_scheduler(folder):
    theirs, ours = load_both(folder)  # DDPMScheduler with 50 training steps
    calls = count_unet_calls(ours)
    got = images(ours)
    assert len(calls) == 50  # diffusers' DDPMPipeline would ask for 1000 of 50 and raise
    np.testing.assert_allclose(got, images(theirs, num_inference_steps=50), atol=2e-5, rtol=0)
    generic = Pipeline(unet=ours.unet, scheduler=DDIMScheduler.from_config(ours.scheduler.config))
    generic.set_progress_bar_config(disable=True)
    calls.clear()
    generic(**NP)
    assert len(calls) == 50 == generic.default_num_inference_steps  # DDIM: 50, as DDIMPipeline
    calls.clear()
    generic(num_inference_steps=7, **NP)
    assert len(calls) == 7


def diffusers_loop(unet, scheduler, seeds, steps, step_kwargs=None):
    """The loop diffusers' own pipelines write for schedulers with input scaling (init_noise_sigma, scale_model_input).
    One generator per image, as ``Pipeline`` does with a list."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    scheduler.set_timesteps(steps)
    x = torch.cat([torch.randn(1, 3, 8, 8, generator=g) for g in gens]) * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, **({"generator": gens} if takes_generator else {}),
                               **(step_kwargs or {})).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_pipeline_with_every_scheduler_matches_diffusers_loop(folder, name):
    """Each scheduler ddpm loads, in our Pipeline, against the same-named diffusers scheduler in diffusers' loop;
    and a list of generators keeps every image reproducible on its own."""
    theirs_unet = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    config = DDPMScheduler.from_pretrained(folder / "scheduler").config
    pipe = Pipeline(unet=UNet.from_pretrained(folder / "unet"), scheduler=SCHEDULERS[name].from_config(config))
    pipe.set_progress_bar_config(disable=True)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = pipe(batch_size=3, generator=gens([5, 6, 7]), num_inference_steps=6, **NP).images
    single = pipe(batch_size=1, generator=gens([6]), num_inference_steps=6, **NP).images
    np.testing.assert_allclose(batch[1:2], single, atol=1e-6, rtol=0)
    expected = diffusers_loop(theirs_unet, getattr(diffusers, name).from_config(dict(config)), [5, 6, 7], 6)
    np.testing.assert_allclose(batch, expected, atol=2e-5, rtol=0)


def test_input_scaling_applied_where_diffusers_ddpm_pipeline_forgets_it(folder):
    """A scheduler with init_noise_sigma != 1 and a non-identity scale_model_input (Euler). Our Pipeline applies
    both, as diffusers' own loops do; diffusers' DDPMPipeline skips them and gives other images (docs/parity.md)."""
    theirs, ours = load_both(folder)
    config = dict(diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").config)
    ours.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)  # a diffusers scheduler object works too
    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    assert ours.scheduler.init_noise_sigma > 1
    got = ours(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], num_inference_steps=8,
               **NP).images
    expected = diffusers_loop(diffusers.UNet2DModel.from_pretrained(folder / "unet"),
                              diffusers.EulerDiscreteScheduler.from_config(config), [1, 2], 8)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    forgetful = theirs(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                       num_inference_steps=8, **NP).images
    assert np.abs(forgetful - expected).max() > 0.05


def test_eta_only_where_the_scheduler_takes_it(folder):
    _, ours = load_both(folder)
    generic = Pipeline(unet=ours.unet, scheduler=ours.scheduler)
    generic.set_progress_bar_config(disable=True)
    generic(num_inference_steps=2, eta=0.0)  # the default is fine for any scheduler
    with pytest.raises(ValueError, match="eta=0.5.*DDPMScheduler.step takes no eta"):
        generic(num_inference_steps=2, eta=0.5)
    with pytest.raises(ValueError, match="use_clipped_model_output"):
        generic(num_inference_steps=2, use_clipped_model_output=True)
    with pytest.raises(TypeError):
        ours(num_inference_steps=2, eta=0.5)  # DDPMPipeline has no eta, as in diffusers


def test_compiled_unet_in_a_pipeline(folder, tmp_path, monkeypatch):
    """A ``torch.compile``'d UNet (an OptimizedModule wrapper): config, device, dtype, to() and save work through
    the wrapper. Dynamo itself is switched off here (the wrapper stays): tracing this UNet on CPU takes ~30 s."""
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    theirs, ours = load_both(folder)
    compiled = torch.compile(UNet.from_pretrained(folder / "unet"), backend="eager")
    assert type(compiled).__name__ == "OptimizedModule"
    pipe = DDPMPipeline(unet=compiled, scheduler=ours.scheduler)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_size == 8 and pipe.device.type == "cpu" and pipe.dtype == torch.float32
    assert pipe.components["unet"] is compiled
    np.testing.assert_allclose(images(pipe, num_inference_steps=4), images(theirs, num_inference_steps=4),
                               atol=2e-5, rtol=0)
    pipe.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    pipe.to(torch.float32).save_pretrained(tmp_path / "from-compiled")
    back = diffusers.DDPMPipeline.from_pretrained(tmp_path / "from-compiled")  # no _orig_mod. prefixes
    assert list(back.unet.state_dict()) == list(theirs.unet.state_dict())


def test_bad_call_arguments(folder):
    _, ours = load_both(folder)
    with pytest.raises(ValueError, match="batch_size"):
        ours(batch_size=0)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        ours(num_inference_steps=0)  # not "the default"
    with pytest.raises(ValueError, match="2 generators for batch_size=3"):
        ours(batch_size=3, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="slice_size"):
        ours.enable_attention_slicing(slice_size=-1)
    ours.enable_attention_slicing()  # accepted and changes nothing, as diffusers does for UNet2DModel
    np.testing.assert_array_equal(images(ours, num_inference_steps=2), images(ours, num_inference_steps=2))


def test_outputs_survive_accelerate_like_diffusers_outputs(folder):
    """accelerate rebuilds outputs as type(out)(dict) when it casts (mixed precision wraps forward in
    convert_outputs_to_fp32) or moves them (send_to_device). diffusers' BaseOutput takes that dict; so does ours."""
    from accelerate.utils.operations import convert_outputs_to_fp32, send_to_device

    theirs, ours = load_both(folder)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for lib, pipe in (("diffusers", theirs), ("ddpm", ours)):
        pipe.to(torch.bfloat16)
        out = convert_outputs_to_fp32(pipe.unet.forward)(x.bfloat16(), 10)
        assert type(out).__name__ == "UNet2DOutput" and out.sample.dtype == torch.float32, lib
        pipe.scheduler.set_timesteps(5)
        step = send_to_device(pipe.scheduler.step(out.sample, pipe.scheduler.timesteps[0], x), "cpu")
        assert isinstance(step.prev_sample, torch.Tensor) and isinstance(step.pred_original_sample, torch.Tensor), lib
        images = send_to_device(pipe(num_inference_steps=1, output_type="pt"), "cpu")
        assert isinstance(images.images, torch.Tensor), lib
