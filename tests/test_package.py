"""The package imports and works without diffusers, which is a test-only reference."""

import subprocess
import sys


def test_import_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import ddpm\n"
        "from ddpm import UNet, DDPMScheduler, DDIMScheduler, Pipeline\n"
        "import ddpm.sample, ddpm.train\n"
        "unet = UNet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,\n"
        "            down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'))\n"
        "pipe = Pipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "print(len(pipe(batch_size=2, num_inference_steps=3).images))\n"
        "assert 'diffusers' not in [m.split('.')[0] for m, v in sys.modules.items() if v is not None]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "2"


def test_diffusers_is_not_a_runtime_dependency():
    from importlib.metadata import requires

    runtime = [r for r in requires("ddpm") or [] if "extra ==" not in r]
    assert runtime, "ddpm declares runtime dependencies"
    assert not any(r.lower().startswith("diffusers") for r in runtime)
    assert any(r.startswith("diffusers==0.42.1") and "extra == \"test\"" in r for r in requires("ddpm") or [])
