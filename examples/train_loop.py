"""The diffusion course's hand-written training loop (unit 1), with ddpm instead of diffusers.

Trains a small UNet on the Fashion-MNIST subset bundled with ddpm, then samples a grid with the trained
pipeline and with a manual loop over ``scheduler.timesteps``. A few minutes on a laptop CPU:

    python examples/train_loop.py --output_dir course-unit1
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpm import DDPMScheduler, Pipeline, UNet
from ddpm.data import load_real_images
from ddpm.images import make_grid, to_pil

p = argparse.ArgumentParser()
p.add_argument("--output_dir", default="course-unit1")
p.add_argument("--image_size", type=int, default=32)
p.add_argument("--batch_size", type=int, default=64)
p.add_argument("--steps", type=int, default=600)
p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
p.add_argument("--sample_steps", type=int, default=1000)
args = p.parse_args()
torch.manual_seed(0)

# Data: the bundled Fashion-MNIST subset as [N x 1 x H x W] in [-1, 1] (the course's Resize/ToTensor/Normalize;
# the random flip is applied per batch below).
images = load_real_images(None, None, args.image_size, channels=1).images
loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)

levels = len(args.channels)
model = UNet(
    sample_size=args.image_size,
    in_channels=1,  # grayscale clothing (the course's butterflies are RGB: 3)
    out_channels=1,
    layers_per_block=1,
    block_out_channels=tuple(args.channels),
    norm_num_groups=min(8, args.channels[0]),
    down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
    up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
)
noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4)

losses: list[float] = []
step = 0
bar = tqdm(total=args.steps, desc="training")
while step < args.steps:
    for clean_images in loader:
        if torch.rand(()) < 0.5:
            clean_images = clean_images.flip(-1)
        noise = torch.randn(clean_images.shape)
        timesteps = torch.randint(0, noise_scheduler.num_train_timesteps, (clean_images.shape[0],)).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
        loss = F.mse_loss(noise_pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step == args.steps:
            break
bar.close()

out = Path(args.output_dir)
image_pipe = Pipeline(unet=model, scheduler=noise_scheduler)
image_pipe.save_pretrained(out / "my_pipeline")
grid = make_grid(image_pipe(batch_size=16, num_inference_steps=args.sample_steps,
                            generator=torch.manual_seed(0)).images, rows=4, cols=4)
grid.save(out / "pipeline_grid.png")

# The course's manual sampling loop.
noise_scheduler.set_timesteps(args.sample_steps)
sample = torch.randn(8, 1, args.image_size, args.image_size)
for t in tqdm(noise_scheduler.timesteps, desc="manual sampling"):
    with torch.no_grad():
        residual = model(sample, t).sample
    sample = noise_scheduler.step(residual, t, sample).prev_sample
make_grid(to_pil(sample), rows=2, cols=4).save(out / "manual_grid.png")
print(f"final loss {sum(losses[-50:]) / len(losses[-50:]):.4f}; wrote {out}/pipeline_grid.png and manual_grid.png")
