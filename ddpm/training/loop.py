"""The training loop of ``python -m ddpm.train``: one Accelerate loop, no callbacks.

Per micro-batch: noise and timesteps from the global RNG (seeded per process), the noisy images of Eq. 4
(Ho et al. 2020), the UNet's prediction and the float32 loss of ``loss.py``. Per optimiser step (when
``accelerator.sync_gradients``): clip the gradient norm to 1, step the optimiser, the LR schedule and the EMA,
log, and checkpoint every ``--checkpointing_steps``. Per epoch: a sample grid every ``--save_images_epochs``
and the pipeline every ``--save_model_epochs`` (and after the last). The main process owns the EMA, the
grids and the files; every process joins in checkpoints (each saves its own RNG state).

Resume is bit-exact on CPU: the data order and augmentations are fixed functions of (seed, epoch, row), the
RNG state of every process is restored, and the batches already seen in the current epoch are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddpm import data
from ddpm.ema import EMA
from ddpm.images import make_grid
from ddpm.pipeline import Pipeline
from ddpm.schedulers import DDIMScheduler, DDPMScheduler
from ddpm.training import checkpoints, outputs
from ddpm.training.args import GPU_HINT, TrainConfig, config_for_logging
from ddpm.training.loss import diffusion_loss
from ddpm.training.lr import get_scheduler
from ddpm.training.signals import StopRequest
from ddpm.unet import UNet

T = TypeVar("T")
log = logging.getLogger("ddpm.train")


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended: its folder, optimiser-step count, epoch, last checkpoint, and the signal that stopped
    it early (``None`` when it ran to the end)."""

    output_dir: str
    global_step: int
    epoch: int
    last_checkpoint: str | None
    stopped_by: str | None = None


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite more often than ``--max_nan_skips`` allows."""


def train(config: TrainConfig) -> TrainResult:
    """Train a UNet as configured; see docs/training.md. Works under ``accelerate launch`` and
    ``accelerate.notebook_launcher(train, (config,))``."""
    # `accelerate launch --mixed_precision X` applies when --mixed_precision is left at its default "no".
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if config.mixed_precision == "no" and launcher_precision in ("fp16", "bf16"):
        config = dataclasses.replace(config, mixed_precision="fp16" if launcher_precision == "fp16" else "bf16")
    _check_environment(config)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, this is what makes `--multi_gpu` processes use gloo together
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.logger,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=os.path.join(config.output_dir, config.logging_dir)),
        # Gradients as views of DDP's all-reduce buckets: no second copy of them per step (measured: the same step
        # time as without, 2 CPU processes; benchmarks/README.md), and they keep the parameters' strides.
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )
    _setup_logging(accelerator)
    try:
        with StopRequest() as stop:  # from here on, SIGTERM/Ctrl-C mean "checkpoint after this step, then stop"
            return _train(config, accelerator, stop)
    finally:
        accelerator.end_training()
        _reset_accelerate()


def _train(config: TrainConfig, accelerator: Accelerator, stop: StopRequest) -> TrainResult:
    is_main = accelerator.is_main_process
    if config.uses_embedded_data:
        accelerator.print(GPU_HINT)

    # ---- model config, resume point, output folder, data (checked by the main process, errors on all) ----
    unet_config = outputs.model_config(config)
    resume_path: Path | None = None
    if config.resume_from_checkpoint is not None:
        resume_path = _on_main(accelerator, lambda: checkpoints.resolve_resume(config.output_dir,
                                                                                config.resume_from_checkpoint or ""))
        if resume_path is None:
            accelerator.print(f"no checkpoint in {config.output_dir} yet: starting a new training run")
    resumed_state = checkpoints.read_state(resume_path) if resume_path is not None else {}
    _on_main(accelerator, lambda: outputs.check_output_dir(config, unet_config, resuming=resume_path is not None))
    if is_main:
        os.makedirs(config.output_dir, exist_ok=True)

    source_args = (config.dataset_name, config.dataset_config_name, config.train_data_dir, config.cache_dir)
    rows = _on_main(accelerator, lambda: data.readable_rows(data.open_source(*source_args), progress=True))
    source = data.open_source(*source_args)  # the main process built any cache above

    seed = config.seed if config.seed is not None else resumed_state.get("seed")
    if seed is None:
        seed = _on_main(accelerator, lambda: secrets.randbelow(2**31))
        accelerator.print(f"seed {seed} (pass --seed {seed} to repeat this run)")
    elif config.seed is not None and resumed_state.get("seed", seed) != seed:
        log.warning("warning: --seed %s differs from the checkpoint's seed %s: the data order will not continue "
                    "the original run's", seed, resumed_state["seed"])

    # ---- model, noise schedule, optimiser, data loader ----
    set_seed(seed)  # the same initial weights on every process
    model = UNet.from_config(unet_config)
    set_seed(seed, device_specific=True)  # then different noise on each process
    noise_scheduler = DDPMScheduler(num_train_timesteps=config.ddpm_num_steps, beta_schedule=config.ddpm_beta_schedule,
                                    prediction_type=config.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    preprocess = data.Preprocess(config.resolution, config.center_crop, config.random_flip,
                                 channels=model.config.in_channels,
                                 preserve_input_precision=config.preserve_input_precision)
    dataset = data.TrainDataset(source, rows, preprocess, seed)
    sampler = data.EpochSampler(len(dataset), seed)
    train_dataloader = DataLoader(dataset, batch_size=config.train_batch_size, sampler=sampler,
                                  num_workers=config.dataloader_num_workers,
                                  generator=torch.Generator().manual_seed(seed))  # never the global RNG
    model, optimizer_wrapped, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    batches_per_epoch = len(train_dataloader)  # per process
    updates_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or config.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    # The LR schedule counts optimiser steps; it is stepped by hand, never by accelerate (which would step it
    # once per process).
    lr_schedule = get_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, max_train_steps)
    accelerator.register_for_checkpointing(lr_schedule)
    unwrapped: UNet = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, config.ema_max_decay, config.ema_inv_gamma, config.ema_power) \
        if config.use_ema and is_main else None

    # ---- resume ----
    global_step, first_epoch, skip_batches, nan_skips = 0, 0, 0, 0
    last_checkpoint = str(resume_path) if resume_path is not None else None
    if resume_path is not None:
        checkpoints.load_checkpoint(accelerator, resume_path, ema, expect_ema=config.use_ema)
        global_step, nan_skips = int(resumed_state["global_step"]), int(resumed_state.get("nan_skips", 0))
        if is_main:
            for old, new in checkpoints.set_aside_newer(config.output_dir, global_step):
                log.warning("warning: %s is newer than the checkpoint resumed from: renamed to %s (kept, but no "
                            "longer pruned or picked by 'latest')", old.name, new.name)
        accelerator.wait_for_everyone()
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * config.gradient_accumulation_steps
        if resumed_state.get("batches_per_epoch") != batches_per_epoch:
            log.warning("warning: the checkpoint was written with %s batches per epoch and this run has %s (data, "
                        "batch size or process count changed): the data order will not continue exactly",
                        resumed_state.get("batches_per_epoch"), batches_per_epoch)
        accelerator.print(f"resumed from {resume_path} at step {global_step} (epoch {first_epoch}, skipping "
                          f"{skip_batches} batches already seen)")

    accelerator.init_trackers("train_unconditional", config=config_for_logging(config))
    repo_id = _on_main(accelerator, lambda: outputs.create_hub_repo(config)) if config.push_to_hub else None
    accelerator.print(
        f"***** training *****\n  examples = {len(dataset)} ({source.description or data.EMBEDDED_NAME})\n"
        f"  epochs = {num_epochs}, batches per epoch per process = {batches_per_epoch}\n"
        f"  batch size per process = {config.train_batch_size}, processes = {accelerator.num_processes}, "
        f"accumulation = {config.gradient_accumulation_steps}\n"
        f"  optimisation steps = {max_train_steps}, parameters = {sum(p.numel() for p in unwrapped.parameters()):,}")

    # ---- the loop ----
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)  # for the loss weights, moved once
    with tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
              desc="steps") as progress:
        epoch, first_batch = first_epoch, True
        scorer: _Scorer | None = None  # --eval_epochs: built on first use
        for epoch in range(first_epoch, num_epochs):
            model.train()
            progress.set_description(f"epoch {epoch}")
            sampler.set_epoch(epoch)
            train_dataloader.set_epoch(epoch)
            loader = train_dataloader
            if epoch == first_epoch and skip_batches:
                loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
            window_losses: list[float] = []
            window_finite = True
            for batch in loader:
                if first_batch:  # a record of each process's shard, e.g. for checking multi-process runs
                    print(f"ddpm.train: process {accelerator.process_index}/{accelerator.num_processes}: first "
                          f"batch of epoch {epoch} holds rows {batch['index'].tolist()}", file=sys.stderr, flush=True)
                    first_batch = False
                clean = batch["input"]  # [B, C, H, W] in [-1, 1]
                noise = torch.randn(clean.shape, device=clean.device)
                if config.noise_offset:  # offset noise (Guttenberg 2023): a per-channel constant shift
                    noise = noise + config.noise_offset * torch.randn(clean.shape[:2] + (1, 1), device=clean.device)
                timesteps = torch.randint(0, config.ddpm_num_steps, (clean.shape[0],), device=clean.device)
                noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # Eq. 4 of Ho et al. 2020

                with accelerator.accumulate(model):
                    prediction = model(noisy, timesteps, return_dict=False)[0]
                    loss = diffusion_loss(prediction, clean, noise, timesteps, alphas_cumprod,
                                          config.prediction_type, config.snr_gamma)
                    mean_loss = float(accelerator.gather(loss.detach()[None]).mean())  # the same on every process
                    if math.isfinite(mean_loss):
                        accelerator.backward(loss)
                        window_losses.append(mean_loss)
                    elif window_finite:  # the first bad micro-batch of this optimiser step
                        nan_skips += 1
                        window_finite = False
                        if nan_skips > config.max_nan_skips:
                            raise NonFiniteLossError(_nan_message(mean_loss, global_step + 1, config, last_checkpoint))
                        log.warning("warning: loss is %s at step %d: skipping this optimiser step (%d of "
                                    "--max_nan_skips %d used)", mean_loss, global_step + 1, nan_skips,
                                    config.max_nan_skips)
                    if accelerator.sync_gradients and window_finite:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                        optimizer_wrapped.step()
                    optimizer_wrapped.zero_grad()

                if not accelerator.sync_gradients:
                    continue
                # ---- one optimiser step done ----
                # (a window with a non-finite loss took no step; the zero_grad above dropped its gradients)
                stepped = window_finite and not accelerator.optimizer_step_was_skipped
                if stepped:
                    lr_schedule.step()
                    if ema is not None:
                        ema.step(unwrapped)
                global_step += 1
                logs: dict[str, float] = {"lr": float(lr_schedule.get_last_lr()[0])}
                if window_losses:
                    logs["loss"] = sum(window_losses) / len(window_losses)
                if ema is not None:
                    logs["ema_decay"] = ema.decay
                window_losses, window_finite = [], True
                progress.update(1)
                progress.set_postfix(step=global_step, loss=f"{logs.get('loss', float('nan')):.4f}",
                                     lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)

                stopping = _any_process(accelerator, stop.requested)
                if global_step % config.checkpointing_steps == 0 or stopping:
                    state = {"global_step": global_step, "epoch": epoch, "seed": seed, "nan_skips": nan_skips,
                             "batches_per_epoch": batches_per_epoch, "num_processes": accelerator.num_processes}
                    last_checkpoint = str(_save(accelerator, config, global_step, state, ema))
                if stopping:
                    return _interrupted(accelerator, config, global_step, epoch, last_checkpoint or "",
                                        stop.signal_name or "a signal")
                if global_step >= max_train_steps:
                    break

            # ---- end of epoch: grids and pipeline on the main process ----
            accelerator.wait_for_everyone()
            last = epoch == num_epochs - 1 or global_step >= max_train_steps
            grid = epoch % config.save_images_epochs == 0 or last
            score = bool(config.eval_epochs) and (epoch % config.eval_epochs == 0 or last)
            save = epoch % config.save_model_epochs == 0 or last
            if is_main and (grid or score or save):
                eval_unet = _eval_unet(unwrapped, ema)  # one copy (EMA weights if on) serves all three
                if grid:
                    _sample_grid(config, accelerator, eval_unet, noise_scheduler, epoch, global_step)
                if score:
                    scorer = scorer or _Scorer(config, unwrapped.config, accelerator.device)
                    scorer(eval_unet, noise_scheduler, global_step, accelerator)
                if save:
                    outputs.save_pipeline_atomically(
                        Pipeline(unet=eval_unet, scheduler=DDPMScheduler.from_config(noise_scheduler.config)),
                        config.output_dir)
                    if repo_id is not None:
                        outputs.upload_to_hub(config, repo_id, f"Epoch {epoch}")
            accelerator.wait_for_everyone()
            if last:
                break
    accelerator.print(f"done: {global_step} steps; pipeline saved in {config.output_dir}")
    accelerator.wait_for_everyone()  # before end_training: without it gloo can abort at exit
    return TrainResult(config.output_dir, global_step, epoch, last_checkpoint)


# ---- helpers ------------------------------------------------------------------------------------------------


def _check_environment(config: TrainConfig) -> None:
    import importlib.util

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU: on CPU accelerate would silently train in fp32. "
                         "Use --mixed_precision bf16 (works on CPU) or no")
    module = config.logger  # the package is named like the logger
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"--logger {config.logger} needs the {module} package: pip install {module}")


def _setup_logging(accelerator: Accelerator) -> None:
    root = logging.getLogger("ddpm")
    if not root.handlers and not logging.getLogger().handlers:  # nobody configured logging: print ours plainly
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.propagate = False
    # Warnings once, from the main process; errors from everyone.
    root.setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that a later ``train()`` in this process may differ."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _on_main(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process and give its result to all; its error is raised on every process."""
    if accelerator.num_processes == 1:
        return fn()
    payload: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            payload = [fn(), None]
        except Exception as e:
            payload = [None, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)]
    broadcast_object_list(payload)
    if payload[1] is not None:
        raise ValueError(payload[1])
    result: T = payload[0]
    return result


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    votes = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(votes.item() > 0)


def _save(accelerator: Accelerator, config: TrainConfig, step: int, state: dict[str, Any], ema: EMA | None) -> Path:
    path = checkpoints.save_checkpoint(accelerator, config.output_dir, step, state, ema)
    if accelerator.is_main_process:
        for old in checkpoints.prune_checkpoints(config.output_dir, config.checkpoints_total_limit):
            log.info("removed %s (--checkpoints_total_limit %s)", old, config.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return path


def _interrupted(accelerator: Accelerator, config: TrainConfig, step: int, epoch: int, checkpoint: str,
                 signal_name: str) -> TrainResult:
    accelerator.print(f"ddpm.train: stopped by {signal_name} at step {step}; saved {checkpoint}. Resume with the "
                      f"same flags plus --resume_from_checkpoint latest")
    accelerator.wait_for_everyone()
    return TrainResult(config.output_dir, step, epoch, checkpoint, stopped_by=signal_name)


def _nan_message(value: float, step: int, config: TrainConfig, last_checkpoint: str | None) -> str:
    kept = f"the last good checkpoint, {last_checkpoint}, is kept" if last_checkpoint else "no checkpoint was written"
    precision = " (fp16 overflows easily: try bf16 or no)" if config.mixed_precision == "fp16" else ""
    return (f"loss is {value} at step {step}: stopping ({kept}). Lower --learning_rate (now {config.learning_rate}), "
            f"check --mixed_precision{precision}, or skip a few bad batches with --max_nan_skips K")


def _eval_unet(unwrapped: UNet, ema: EMA | None) -> UNet:
    """A separate copy of the model for sampling and saving, holding the EMA weights when EMA is on."""
    with torch.device("meta"):
        copy = UNet(unwrapped.config)
    copy.load_state_dict({k: v.detach().clone() for k, v in unwrapped.state_dict().items()}, assign=True)
    if ema is not None:
        ema.copy_to(copy)
    return copy.eval()


class _Scorer:
    """Scores samples with ddpm.metrics during training (--eval_epochs). The feature network (trained once,
    cached in output_dir) and the real images' features are prepared on first use and reused."""

    def __init__(self, config: TrainConfig, unet_config: Any, device: torch.device) -> None:
        from ddpm import evaluate, metrics

        self.config, self.device = config, device
        real = evaluate.load_real_images(config.dataset_name, config.train_data_dir, config.resolution,
                                         unet_config.in_channels, config.dataset_config_name, config.cache_dir)
        train, pool = evaluate.split_real_images(real)
        self.extractor = metrics.dataset_extractor(train.images, train.labels, config.output_dir, train.description,
                                                   steps=config.eval_extractor_steps, device=device)
        pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))
        self.reference = metrics.compute_features(self.extractor, pool[pick[:config.eval_num_images]])  # (N, D), once

    def __call__(self, unet: UNet, noise_scheduler: DDPMScheduler, step: int, accelerator: Accelerator) -> None:
        from ddpm import evaluate, metrics

        c = self.config
        pipeline = _inference_pipeline(c, unet, noise_scheduler)
        with _own_rng(accelerator):  # evaluation must not move the training RNG
            generated = evaluate.generate(pipeline, c.eval_num_images, c.eval_batch_size, c.ddpm_num_inference_steps,
                                          progress=False)
            scores = metrics.feature_metrics(self.reference, metrics.compute_features(self.extractor, generated))
        record = {"step": step, **scores, "num_images": c.eval_num_images,
                  "scheduler": type(pipeline.scheduler).__name__,
                  "num_inference_steps": c.ddpm_num_inference_steps, "ema": c.use_ema}
        evaluate.log_metrics(c.output_dir, record, {}, step=step)  # metrics.jsonl
        accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)  # the run's tensorboard
        accelerator.print("eval at step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items())))


def _inference_pipeline(config: TrainConfig, unet: UNet, noise_scheduler: DDPMScheduler) -> Pipeline:
    # The sampling pipeline of --ddpm_inference_scheduler, on the training schedule, with no per-step bars
    scheduler_cls = DDIMScheduler if config.ddpm_inference_scheduler == "ddim" else DDPMScheduler
    pipeline = Pipeline(unet=unet, scheduler=scheduler_cls.from_config(noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _own_rng(accelerator: Accelerator) -> Any:
    # A block whose random draws leave the training RNG (CPU, and the CUDA device if any) as it was
    return torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else [])


def _sample_grid(config: TrainConfig, accelerator: Accelerator, unet: UNet, noise_scheduler: DDPMScheduler,
                 epoch: int, global_step: int) -> None:
    pipeline = _inference_pipeline(config, unet, noise_scheduler)
    with _own_rng(accelerator):  # sampling must not move the training RNG
        images: list[Any] = list(pipeline(batch_size=config.eval_batch_size,
                                          generator=torch.Generator().manual_seed(0),
                                          num_inference_steps=config.ddpm_num_inference_steps, output_type="pil",
                                          return_dict=False)[0])  # PIL images
    folder = Path(config.output_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    make_grid(images).save(folder / f"epoch_{epoch:04d}.png")
    if config.logger == "tensorboard":
        import numpy as np

        pixels = np.stack([np.asarray(im.convert("RGB")) for im in images]).transpose(0, 3, 1, 2)  # [N, 3, H, W]
        accelerator.get_tracker("tensorboard", unwrap=True).add_images("test_samples", pixels, epoch)
    else:
        import wandb

        accelerator.get_tracker("wandb").log({"test_samples": [wandb.Image(im) for im in images], "epoch": epoch},
                                             step=global_step)

