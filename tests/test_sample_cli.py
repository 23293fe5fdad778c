"""``python -m ddpm.sample`` end to end on a tiny saved pipeline, and its one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DDPMScheduler, Pipeline, UNet


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    path = tmp_path_factory.mktemp("pipe") / "tiny"
    Pipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(path)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ddpm.sample", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


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
