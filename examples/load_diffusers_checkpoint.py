"""A pipeline saved by diffusers, loaded and sampled by ddpm, with the same images from the same generator.

diffusers is only needed to write the checkpoint here (it is in ddpm's test extra); point --model at any
diffusers DDPMPipeline folder (or hub id, when online) to skip that part.

    python examples/load_diffusers_checkpoint.py --output from-diffusers
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from ddpm import Pipeline

p = argparse.ArgumentParser()
p.add_argument("--model", default=None, help="a diffusers pipeline folder; default: make one with diffusers")
p.add_argument("--output", default="from-diffusers")
p.add_argument("--steps", type=int, default=50)
args = p.parse_args()
out = Path(args.output)

if args.model is None:
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, block_out_channels=(32, 64, 64, 64), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    reference = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    reference.save_pretrained(out / "diffusers-pipeline")
    args.model = out / "diffusers-pipeline"
    expected = reference(batch_size=4, generator=torch.manual_seed(0), num_inference_steps=args.steps,
                         output_type="np").images

pipe = Pipeline.from_pretrained(args.model)
images = pipe(batch_size=4, generator=torch.manual_seed(0), num_inference_steps=args.steps, output_type="np").images
if "expected" in globals():
    print(f"largest pixel difference from diffusers: {np.abs(images - expected).max():.2e}")
pipe.save_pretrained(out / "saved-by-ddpm")  # and diffusers loads this one back
print(f"loaded {args.model}; re-saved to {out / 'saved-by-ddpm'}")
