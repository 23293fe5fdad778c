"""Load a saved pipeline and write sample grids with DDPM (1000 steps) and DDIM (50 steps).

    python examples/sample_and_grid.py --model ddpm-model-64 --output grids
"""

import argparse
import time
from pathlib import Path

import torch

from ddpm import DDIMScheduler, Pipeline
from ddpm.images import make_grid

p = argparse.ArgumentParser()
p.add_argument("--model", required=True, help="a pipeline folder (diffusers or ddpm) or hub repo id")
p.add_argument("--output", default="grids")
p.add_argument("--num_images", type=int, default=16)
p.add_argument("--ddpm_steps", type=int, default=1000)
p.add_argument("--ddim_steps", type=int, default=50)
args = p.parse_args()

out = Path(args.output)
out.mkdir(parents=True, exist_ok=True)
pipe = Pipeline.from_pretrained(args.model)
ddpm_scheduler = pipe.scheduler
for name, scheduler, steps in [("ddpm", ddpm_scheduler, args.ddpm_steps),
                               ("ddim", DDIMScheduler.from_config(ddpm_scheduler.config), args.ddim_steps)]:
    pipe.scheduler = scheduler
    start = time.perf_counter()
    # One generator per image: image i is the same whatever the batch size.
    generators = [torch.Generator().manual_seed(i) for i in range(args.num_images)]
    images = pipe(batch_size=args.num_images, generator=generators, num_inference_steps=steps).images
    make_grid(images).save(out / f"{name}_{steps}.png")
    print(f"{name} {steps} steps: {time.perf_counter() - start:.1f}s -> {out / f'{name}_{steps}.png'}")
