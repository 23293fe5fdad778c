"""Course unit 1 (shared/seeds 004) runs with only its imports swapped to ddpm.

The code below is the course's, shrunk to a tiny model and a synthetic in-memory dataset (the hub dataset
can't be downloaded here). Each line that differs from the course says so.
"""

import os

import torch
import torch.nn.functional as F

from ddpm import DDPMScheduler, Pipeline  # was: from diffusers import DDPMScheduler, DDPMPipeline
from ddpm import UNet as UNet2DModel  # was: from diffusers import UNet2DModel

DDPMPipeline = Pipeline


def test_course_unit1_training_loop_pipeline_save_and_manual_sampling(tmp_path):
    device = "cpu"
    image_size = 16  # course: 32
    batch_size = 4  # course: 64
    # Synthetic stand-in for the butterflies dataset after the course's transforms: [-1, 1] images.
    generator = torch.Generator().manual_seed(0)
    data = [{"images": torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1} for _ in range(3)]
    train_dataloader = data

    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    xb = next(iter(train_dataloader))["images"].to(device)[:8]
    timesteps = torch.linspace(0, 999, 8).long().to(device)[: xb.shape[0]]
    noise = torch.randn_like(xb)
    noisy_xb = noise_scheduler.add_noise(xb, noise, timesteps)
    assert noisy_xb.shape == xb.shape

    model = UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,  # course: 2
        block_out_channels=(8, 16, 16, 32),  # course: (64, 128, 128, 256)
        norm_num_groups=4,  # course: default 32 (needs >= 32 channels)
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    model.to(device)
    with torch.no_grad():
        model_prediction = model(noisy_xb, timesteps).sample
    assert model_prediction.shape == noisy_xb.shape

    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4)
    losses = []
    for epoch in range(2):  # course: 30
        for step, batch in enumerate(train_dataloader):
            clean_images = batch["images"].to(device)
            noise = torch.randn(clean_images.shape).to(clean_images.device)
            bs = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.num_train_timesteps, (bs,), device=clean_images.device).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
            loss = F.mse_loss(noise_pred, noise)
            loss.backward(loss)
            losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))

    image_pipe = DDPMPipeline(unet=model, scheduler=noise_scheduler)
    image_pipe.set_progress_bar_config(disable=True)
    pipeline_output = image_pipe(num_inference_steps=5)  # course: the default 1000 steps
    assert pipeline_output.images[0].size == (image_size, image_size)

    image_pipe.save_pretrained(tmp_path / "my_pipeline")
    assert sorted(os.listdir(tmp_path / "my_pipeline")) == ["model_index.json", "scheduler", "unet"]
    assert sorted(os.listdir(tmp_path / "my_pipeline" / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]

    noise_scheduler.set_timesteps(20)  # course: the 1000 training steps
    sample = torch.randn(8, 3, image_size, image_size).to(device)
    for i, t in enumerate(noise_scheduler.timesteps):
        with torch.no_grad():
            residual = model(sample, t).sample
        sample = noise_scheduler.step(residual, t, sample).prev_sample
    assert sample.shape == (8, 3, image_size, image_size) and torch.isfinite(sample).all()
    assert i == 19
