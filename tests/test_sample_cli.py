"""``python -m ddpm.sample`` end to end: pipelines and training checkpoints (ddpm's layout and diffusers'
train_unconditional.py's), the output folder rules, --help, and one-line errors.

Images are compared with a reference pipeline built in the test from the same weights and the same per-image
generators (in this process, so both run on the same threads and match exactly).
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DDIMScheduler, DDPMScheduler, Pipeline, UNet, sample
from ddpm.cli import DEFAULT_SCHEDULER, run
from ddpm.schedulers import sampler

TINY = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def tiny_unet(seed):
    torch.manual_seed(seed)
    return UNet(**TINY)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny"
    Pipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(path)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ddpm.sample", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def run_in_process(capsys, *args):
    """``python -m ddpm.sample ARGS`` in this process: (status, stdout, stderr)."""
    status = run(sample.main, list(map(str, args)), prog="ddpm.sample")
    out, err = capsys.readouterr()
    return status, out, err


def reference_images(unet, scheduler, num_images, steps, seed=0):
    """What ddpm.sample must write: image i from its own generator seeded seed + i, as 8-bit pixels."""
    pipe = Pipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    images = pipe(batch_size=num_images, generator=generators, num_inference_steps=steps).images
    return [np.asarray(im) for im in images]


def written_images(folder, num_images):
    return [np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(num_images)]


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_writes_grid_and_single_images(tiny_pipeline, tmp_path, scheduler):
    out = tmp_path / "out"
    r = run_cli("--model", tiny_pipeline, "--num_images", 5, "--batch_size", 2, "--num_inference_steps", 4,
                "--scheduler", scheduler, "--seed", 3, "--output", out)
    assert r.returncode == 0, r.stderr
    singles = sorted(p.name for p in out.glob("0*.png"))
    assert singles == [f"{i:05d}.png" for i in range(5)]
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 8, 2 * 8)  # 5 images: 3 columns x 2 rows
    assert "4/4" in r.stderr  # progress bar
    # Image i is seeded seed+i: the same whatever the batch size.
    out2 = tmp_path / "out2"
    r = run_cli("--model", tiny_pipeline, "--num_images", 2, "--batch_size", 1, "--num_inference_steps", 4,
                "--scheduler", scheduler, "--seed", 3, "--output", out2)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00001.png")), np.asarray(Image.open(out2 / "00001.png")))


def test_default_sampler_is_sde_dpm_solver_with_its_own_step_count(tmp_path, capsys):
    # SDE-DPM-Solver++(2M), 20 steps (docs/samplers.md), as diffusers' scheduler of that name gives them; on a
    # 12-step model, the 11 steps from t = 11 down to t = 1 that its 13-point grid has (diffusers' own schedule,
    # asked for 12, repeats t = 6 and fails: docs/parity.md), and they are finite.
    import diffusers

    for timesteps, steps in ((1000, 20), (12, 11)):
        unet, scheduler = tiny_unet(0), DDPMScheduler(num_train_timesteps=timesteps)
        Pipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / f"m{timesteps}")
        out = tmp_path / f"o{timesteps}"
        status, stdout, err = run_in_process(capsys, "--model", tmp_path / f"m{timesteps}", "--num_images", 2,
                                             "--output", out)
        assert status == 0, err
        assert f"DPMSolverMultistepScheduler with {steps} steps" in stdout
        reference = diffusers.DPMSolverMultistepScheduler.from_pretrained(
            tmp_path / f"m{timesteps}", subfolder="scheduler", algorithm_type="sde-dpmsolver++")
        for got, want in zip(written_images(out, 2), reference_images(unet, reference, 2, steps)):
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


# Each --scheduler name with its flags against the diffusers scheduler it stands for (their class, their settings),
# run in our Pipeline on the same weights: the name table and the flags, checked against an independent reference.
SAMPLER_CASES = [
    ("dpm", [], "DPMSolverMultistepScheduler", {}),
    ("dpm", ["--solver_order", "3", "--karras_sigmas"], "DPMSolverMultistepScheduler",
     {"solver_order": 3, "use_karras_sigmas": True}),
    ("sde-dpm", [], "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc", ["--solver_order", "1"], "UniPCMultistepScheduler", {"solver_order": 1}),
    ("euler", [], "EulerDiscreteScheduler", {}),
    ("heun", ["--karras_sigmas"], "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("name, flags, theirs, settings", SAMPLER_CASES)
def test_fast_samplers_by_name_match_diffusers_schedulers(tmp_path, capsys, name, flags, theirs, settings):
    import diffusers

    unet, scheduler = tiny_unet(0), DDPMScheduler(num_train_timesteps=50)
    Pipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "m")
    status, stdout, err = run_in_process(capsys, "--model", tmp_path / "m", "--num_images", 2, "--output",
                                         tmp_path / "o", "--scheduler", name, "--num_inference_steps", 4, *flags)
    assert status == 0, err
    assert f"{theirs} with 4 steps" in stdout
    # as a diffusers user swaps it in: from the saved scheduler config, with the settings on top
    reference = getattr(diffusers, theirs).from_pretrained(tmp_path / "m", subfolder="scheduler", **settings)
    expected = reference_images(unet, reference, 2, 4)
    for got, want in zip(written_images(tmp_path / "o", 2), expected):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # 8-bit pixels; the fp32 loops agree to ~1e-7


# ---- training checkpoints ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddpm_checkpoint(tmp_path_factory):
    """A checkpoint as contract 1 (docs/architecture.md) says ddpm.train writes it, built by hand: raw and EMA
    weights that differ, and a non-default training schedule in scheduler/."""
    run_dir = tmp_path_factory.mktemp("run")
    folder = run_dir / "checkpoint-7"
    raw, ema = tiny_unet(1), tiny_unet(2)
    raw.save_pretrained(folder / "unet")
    ema.save_pretrained(folder / "unet_ema")
    DDPMScheduler(num_train_timesteps=30, beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    (folder / "COMPLETE").write_text("")
    # as read back: a saved config lists every key, so sampler() carries DDPM's "leading" spacing (diffusers'
    # from_config does the same), where a fresh object's defaults would give way to the sampler's own
    return {"folder": folder, "raw": raw, "ema": ema, "scheduler": DDPMScheduler.from_pretrained(folder / "scheduler")}


@pytest.mark.parametrize("no_ema", [False, True])
def test_samples_a_ddpm_training_checkpoint(ddpm_checkpoint, tmp_path, capsys, no_ema):
    c = ddpm_checkpoint
    out = tmp_path / "out"
    status, stdout, err = run_in_process(capsys, "--model", c["folder"], "--num_images", 3, "--batch_size", 2,
                                         "--num_inference_steps", 4, "--output", out, *(["--no_ema"] if no_ema else []))
    assert status == 0, err
    assert ("raw weights" if no_ema else "EMA weights") in stdout
    scheduler = sampler(DEFAULT_SCHEDULER, c["scheduler"].config)  # the default sampler on the run's schedule
    expected = reference_images(c["raw" if no_ema else "ema"], scheduler, 3, 4)
    other = reference_images(c["ema" if no_ema else "raw"], scheduler, 3, 4)
    for got, want, not_want in zip(written_images(out, 3), expected, other):
        np.testing.assert_array_equal(got, want)
        assert np.abs(got.astype(int) - not_want.astype(int)).max() > 10


def test_a_checkpoint_without_ema_weights_samples_the_raw_ones(ddpm_checkpoint, tmp_path, capsys):
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(ddpm_checkpoint["folder"], folder)
    shutil.rmtree(folder / "unet_ema")
    status, stdout, err = run_in_process(capsys, "--model", folder, "--num_images", 2, "--num_inference_steps", 3,
                                         "--scheduler", "ddpm", "--output", tmp_path / "out")
    assert status == 0, err
    assert "raw weights" in stdout
    scheduler = DDPMScheduler.from_config(ddpm_checkpoint["scheduler"].config)
    expected = reference_images(ddpm_checkpoint["raw"], scheduler, 2, 3)
    for got, want in zip(written_images(tmp_path / "out", 2), expected):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def diffusers_run(tmp_path_factory):
    """An output_dir as diffusers' train_unconditional.py leaves it, written by diffusers itself: the pipeline
    (model_index.json, unet/, scheduler/) and checkpoint-5/ with unet/ and unet_ema/ (EMAModel.save_pretrained,
    whose config.json carries the EMA's own keys) and no scheduler."""
    from diffusers import DDPMPipeline, UNet2DModel
    from diffusers import DDPMScheduler as DiffusersDDPMScheduler
    from diffusers.training_utils import EMAModel

    root = tmp_path_factory.mktemp("diffusers_run")
    run_dir = root / "run"
    torch.manual_seed(3)
    raw = UNet2DModel(**TINY)
    torch.manual_seed(4)
    ema = UNet2DModel(**TINY)
    DDPMPipeline(unet=raw, scheduler=DiffusersDDPMScheduler(num_train_timesteps=25)).save_pretrained(run_dir)
    checkpoint = run_dir / "checkpoint-5"
    raw.save_pretrained(checkpoint / "unet")
    ema_model = EMAModel(ema.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                         model_cls=UNet2DModel, model_config=ema.config)
    ema_model.save_pretrained(checkpoint / "unet_ema")
    ema.save_pretrained(root / "ema-plain")  # the same EMA weights in a plain model folder, for the reference
    return {"run": run_dir, "checkpoint": checkpoint, "raw": UNet.from_pretrained(checkpoint / "unet"),
            "ema": UNet.from_pretrained(root / "ema-plain"), "scheduler": DDPMScheduler.from_pretrained(run_dir / "scheduler")}


def test_diffusers_checkpoint_raw_weights_with_the_runs_scheduler(diffusers_run, tmp_path, capsys):
    d = diffusers_run
    status, stdout, err = run_in_process(capsys, "--model", d["checkpoint"], "--no_ema", "--num_images", 2,
                                         "--num_inference_steps", 3, "--scheduler", "ddpm", "--output", tmp_path / "o")
    assert status == 0, err
    assert "raw weights" in stdout and err.count("note:") == 0
    expected = reference_images(d["raw"], DDPMScheduler.from_config(d["scheduler"].config), 2, 3)
    for got, want in zip(written_images(tmp_path / "o", 2), expected):
        np.testing.assert_array_equal(got, want)
    # 25 training steps came from the run's pipeline: 26 are refused.
    status, _, err = run_in_process(capsys, "--model", d["checkpoint"], "--no_ema", "--num_inference_steps", 26,
                                    "--output", tmp_path / "o2")
    assert status == 2 and "(25)" in err


def test_diffusers_checkpoint_ema_weights(diffusers_run, tmp_path, capsys):
    # Needs the UNet loader to ignore exactly the keys EMAModel.save_pretrained adds (contract 1; helper "surface").
    d = diffusers_run
    status, stdout, err = run_in_process(capsys, "--model", d["checkpoint"], "--num_images", 2,
                                         "--num_inference_steps", 3, "--output", tmp_path / "o")
    assert status == 0, err
    assert "EMA weights" in stdout
    expected = reference_images(d["ema"], sampler(DEFAULT_SCHEDULER, d["scheduler"].config), 2, 3)
    for got, want in zip(written_images(tmp_path / "o", 2), expected):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_without_any_scheduler_says_it_uses_the_default(diffusers_run, tmp_path, capsys):
    alone = tmp_path / "copied" / "checkpoint-5"
    shutil.copytree(diffusers_run["checkpoint"] / "unet", alone / "unet")  # no scheduler/, no run pipeline
    status, stdout, err = run_in_process(capsys, "--model", alone, "--num_images", 1, "--num_inference_steps", 2,
                                         "--output", tmp_path / "o")
    assert status == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "default DDPMScheduler" in notes[0] and str(alone) in notes[0]
    status, _, err = run_in_process(capsys, "--model", alone, "--num_inference_steps", 1001, "--output", tmp_path / "p")
    assert status == 2 and "(1000)" in err  # diffusers' default: 1000 training steps


def test_a_run_folder_without_a_pipeline_names_its_newest_checkpoint(ddpm_checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "run"
    for step in (3, 12):
        shutil.copytree(ddpm_checkpoint["folder"], run_dir / f"checkpoint-{step}")
    status, _, err = run_in_process(capsys, "--model", run_dir, "--output", tmp_path / "o")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(run_dir / "checkpoint-12") in lines[0], err


# ---- the output folder ---------------------------------------------------------------------------------------

def test_refuses_to_mix_old_and_new_samples_unless_overwrite(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--model", tiny_pipeline, "--scheduler", "ddpm", "--num_inference_steps", 2, "--output", out)
    assert run_in_process(capsys, *args, "--num_images", 4)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, _, err = run_in_process(capsys, *args, "--num_images", 2, "--seed", 9)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "--overwrite" in lines[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    status, _, err = run_in_process(capsys, *args, "--num_images", 2, "--seed", 9, "--overwrite")
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "grid.png"]  # no 00002/00003 left
    assert (out / "00000.png").read_bytes() != before["00000.png"]  # seed 9's images, not seed 0's


def test_overwrite_never_deletes_images_it_did_not_write(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    Image.new("L", (4, 4)).save(out / "holiday.jpg")
    Image.new("L", (4, 4)).save(out / "00000.png")
    status, _, err = run_in_process(capsys, "--model", tiny_pipeline, "--output", out, "--overwrite")
    assert status == 2 and "holiday.jpg" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "holiday.jpg"]


# ---- help and errors -----------------------------------------------------------------------------------------

def test_help_shows_the_defaults():
    r = run_cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for default in ("(default: 16)", "(default: sde-dpm)", "(default: samples)", "(default: 0)", "sde-dpm 20",
                    "ddim 50"):
        assert default in text, default
    assert "checkpoint" in text and "--no_ema" in text and "--overwrite" in text


@pytest.mark.parametrize("case", ["missing", "not_a_pipeline", "too_many_steps", "bad_scheduler_class"])
def test_bad_input_is_one_line(tiny_pipeline, tmp_path, case):
    model = {"missing": tmp_path / "nope", "not_a_pipeline": tmp_path, "too_many_steps": tiny_pipeline,
             "bad_scheduler_class": tmp_path / "bad"}[case]
    if case == "bad_scheduler_class":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
        (tmp_path / "bad" / "unet").mkdir()
        for f in (tiny_pipeline / "unet").iterdir():
            (tmp_path / "bad" / "unet" / f.name).write_bytes(f.read_bytes())
        (tmp_path / "bad" / "scheduler").mkdir()
        (tmp_path / "bad" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    r = run_cli("--model", model, "--num_inference_steps", 21 if case == "too_many_steps" else 2,
                "--output", tmp_path / "o")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm.sample: error:"), r.stderr
    expected = {"missing": "nope", "not_a_pipeline": "not a pipeline", "too_many_steps": "num_inference_steps",
                "bad_scheduler_class": "PNDMScheduler"}[case]
    assert expected in lines[0]


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--model", tmp_path / "nope", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
