"""Images drawn during training: the sample grid of each --save_images_epochs and the scores of --eval_epochs.

Both draw from their own generators inside ``torch.random.fork_rng``, so training continues exactly as if they
had never run (a resumed run, which skips grids already made, stays bit-exact). The grid shows a progress bar
nested under the training bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ddpm.images import make_grid
from ddpm.pipeline import Pipeline
from ddpm.schedulers import DDPMScheduler, sampler
from ddpm.training import outputs
from ddpm.training.args import TrainConfig
from ddpm.training.processes import say
from ddpm.unet import UNet


class Scorer:
    """Scores samples with ddpm.metrics during training (--eval_epochs). The feature network (trained once,
    cached in output_dir) and the real images' features are prepared on first use and reused."""

    def __init__(self, config: TrainConfig, unet_config: Any, device: torch.device) -> None:
        from ddpm import data, metrics

        self.config, self.device = config, device
        real = data.load_real_images(config.dataset_name, config.train_data_dir, config.resolution,
                                         unet_config.in_channels, config.dataset_config_name, config.cache_dir)
        train, pool = data.split_real_images(real)
        self.extractor = metrics.dataset_extractor(train.images, train.labels, config.output_dir, train.description,
                                                   steps=config.eval_extractor_steps, device=device)
        pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))
        self.reference = metrics.compute_features(self.extractor, pool[pick[:config.eval_num_images]])  # (N, D), once

    def __call__(self, unet: UNet, noise_scheduler: DDPMScheduler, step: int, accelerator: Accelerator) -> None:
        from ddpm import metrics
        from ddpm.pipeline import generate

        c = self.config
        pipeline = inference_pipeline(c, unet, noise_scheduler)
        with own_rng(accelerator):  # evaluation must not move the training RNG
            generated = generate(pipeline, c.eval_num_images, c.eval_batch_size, c.ddpm_num_inference_steps,
                                          progress=False)
            scores = metrics.feature_metrics(self.reference, metrics.compute_features(self.extractor, generated))
        record = {"step": step, **scores, "num_images": c.eval_num_images,
                  "scheduler": type(pipeline.scheduler).__name__,
                  "num_inference_steps": c.ddpm_num_inference_steps, "ema": c.use_ema}
        metrics.log_metrics(c.output_dir, record, {}, step=step)  # metrics.jsonl
        accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)  # the run's tensorboard
        say(accelerator, "eval at step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items())))


def inference_pipeline(config: TrainConfig, unet: UNet, noise_scheduler: DDPMScheduler,
                        progress: dict[str, Any] | None = None) -> Pipeline:
    # The sampling pipeline of --ddpm_inference_scheduler, on the training schedule; per-step bar as given
    pipeline = Pipeline(unet=unet, scheduler=sampler(config.ddpm_inference_scheduler, noise_scheduler.config))
    pipeline.set_progress_bar_config(**(progress or {"disable": True}))
    return pipeline


def own_rng(accelerator: Accelerator) -> Any:
    # A block whose random draws leave the training RNG (CPU, and the CUDA device if any) as it was
    return torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else [])


def sample_grid(config: TrainConfig, accelerator: Accelerator, unet: UNet, noise_scheduler: DDPMScheduler,
                 epoch: int, global_step: int) -> None:
    # A nested bar under the step bar, so that a long grid does not look like a hang
    bar = {"desc": "sample grid", "position": 1, "leave": False, "dynamic_ncols": True,
           "disable": not accelerator.is_local_main_process}
    pipeline = inference_pipeline(config, unet, noise_scheduler, progress=bar)
    with own_rng(accelerator):  # sampling must not move the training RNG
        images: list[Any] = list(pipeline(batch_size=config.eval_batch_size,
                                          generator=torch.Generator().manual_seed(0),
                                          num_inference_steps=config.ddpm_num_inference_steps, output_type="pil",
                                          return_dict=False)[0])  # PIL images
    outputs.save_image_atomically(make_grid(images), Path(config.output_dir) / "samples" / f"epoch_{epoch:04d}.png")
    if config.logger == "tensorboard":
        import numpy as np

        pixels = np.stack([np.asarray(im.convert("RGB")) for im in images]).transpose(0, 3, 1, 2)  # [N, 3, H, W]
        accelerator.get_tracker("tensorboard", unwrap=True).add_images("test_samples", pixels, epoch)
    else:
        import wandb

        accelerator.get_tracker("wandb").log({"test_samples": [wandb.Image(im) for im in images], "epoch": epoch},
                                             step=global_step)
