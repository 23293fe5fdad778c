"""Every script in examples/ runs, with tiny sizes (the real sizes take minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from ddpm import DDPMScheduler, Pipeline, UNet

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def run(*args, cwd):
    # The interpreter's own bin/ first, so the script finds this environment's `accelerate`.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": path}
    out = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_train_loop(tmp_path):
    run(sys.executable, EXAMPLES / "train_loop.py", "--output_dir", "out", "--image_size", 16, "--batch_size", 8,
        "--steps", 3, "--channels", 8, 16, "--sample_steps", 2, cwd=tmp_path)
    assert Image.open(tmp_path / "out" / "pipeline_grid.png").size == (64, 64)
    assert Image.open(tmp_path / "out" / "manual_grid.png").size == (64, 32)
    assert Pipeline.from_pretrained(tmp_path / "out" / "my_pipeline").unet.config.in_channels == 1


def test_sample_and_grid(tmp_path):
    torch.manual_seed(0)
    Pipeline(unet=UNet(**TINY), scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(tmp_path / "model")
    out = run(sys.executable, EXAMPLES / "sample_and_grid.py", "--model", "model", "--output", "grids",
              "--num_images", 4, "--ddpm_steps", 3, "--ddim_steps", 2, cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["ddim_2.png", "ddpm_3.png"]
    assert "ddim 2 steps" in out.stdout


def test_load_diffusers_checkpoint(tmp_path):
    out = run(sys.executable, EXAMPLES / "load_diffusers_checkpoint.py", "--output", "o", "--steps", 2, cwd=tmp_path)
    difference = float(out.stdout.split("largest pixel difference from diffusers:")[1].split()[0])
    assert difference < 1e-4
    index = json.loads((tmp_path / "o" / "saved-by-ddpm" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"


def test_multi_process_script(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.fromarray((torch.rand(12, 12, 3) * 255).byte().numpy()).save(images / f"{i}.png")
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "in_channels": 3, "out_channels": 3}))
    out = run("bash", EXAMPLES / "multi_process.sh", "mp", "--model_config_name_or_path", "tiny.json",
              "--train_data_dir", "images", "--resolution", 8, "--train_batch_size", 2, "--max_train_steps", 2,
              "--ddpm_num_steps", 20, "--ddpm_num_inference_steps", 2, "--eval_batch_size", 2, "--seed", 0,
              cwd=tmp_path)
    assert (tmp_path / "mp" / "model_index.json").is_file(), out.stdout[-2000:]
    assert "processes = 2" in out.stdout + out.stderr
