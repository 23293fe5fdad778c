"""The training loop of ``python -m ddpm.train``: one Accelerate loop, no callbacks.

Before anything is created or deleted, everything is checked: the flags, the model config, the output and
logging folders, the data, then (holding the output folder's lock) the checkpoint to resume from and the
output folder's contents. Only then does --overwrite_output_dir delete the earlier run.

Per micro-batch: noise and timesteps from the global RNG (seeded per process), the noisy images of Eq. 4
(Ho et al. 2020), the UNet's prediction and the float32 loss of ``loss.py``. Per optimiser step (when
``accelerator.sync_gradients``): clip the gradient norm to 1, step the optimiser, the LR schedule and the EMA,
log, and checkpoint every ``--checkpointing_steps`` and after the last step. Per epoch: a sample grid every
``--save_images_epochs`` and the pipeline every ``--save_model_epochs`` and after the last. The main process
owns the EMA, the grids and the files; every process joins in checkpoints (each saves its own RNG state).

Resume is bit-exact on CPU: the data order and augmentations are fixed functions of (seed, epoch, row), the
RNG state of every process is restored, and the batches already seen in the current epoch are skipped. A
resume at or past the last step trains nothing: it saves the final pipeline if a kill stopped the run before
it was saved, and otherwise changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import shlex
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddpm import data
from ddpm.config import config_to_dict
from ddpm.ema import EMA
from ddpm.pipeline import Pipeline
from ddpm.schedulers import DDPMScheduler
from ddpm.training import checkpoints, cpu, outputs
from ddpm.training import resume as resume_module
from ddpm.training.args import GPU_HINT, TrainConfig, config_for_logging
from ddpm.training.checkpoints import TrainerState, TrainingObjects
from ddpm.training.dataset import EpochSampler, TrainDataset
from ddpm.training.loss import diffusion_loss
from ddpm.training.lr import get_scheduler
from ddpm.training.processes import any_process, on_main, output_folder, reset_accelerate, say, setup_logging
from ddpm.training.samples import Scorer, sample_grid
from ddpm.training.signals import StopRequest
from ddpm.unet import UNet

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


class NonFiniteError(ValueError):
    """The loss or the gradient became NaN or infinite more often than ``--max_nan_skips`` allows, or the
    weights did: training stops before such weights reach a checkpoint or the pipeline."""


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
    setup_logging(accelerator)
    try:
        with StopRequest() as stop:  # from here on, SIGTERM/Ctrl-C mean "checkpoint after this step, then stop"
            result = _train(config, accelerator, stop)
    except BaseException:
        try:  # a tracker that failed to start must not hide the error that stopped the run
            accelerator.end_training()
        except Exception:
            pass
        raise
    else:
        accelerator.end_training()
        return result
    finally:
        reset_accelerate()


def _train(config: TrainConfig, accelerator: Accelerator, stop: StopRequest) -> TrainResult:
    if config.uses_embedded_data:
        say(accelerator, GPU_HINT)

    # ---- checks that create nothing: model config, folders, data ----
    unet_config = outputs.model_config(config)
    on_main(accelerator, lambda: outputs.check_paths(config))
    source_args = (config.dataset_name, config.dataset_config_name, config.train_data_dir, config.cache_dir)
    opened: list[data.ImageSource] = []  # the main process's source, reused: opening a folder takes seconds

    def check_data() -> list[int]:
        opened.append(data.open_source(*source_args))
        return data.readable_rows(opened[0], progress=True, channels=unet_config.get("in_channels", 3),
                                  preserve_input_precision=config.preserve_input_precision)

    rows = on_main(accelerator, check_data)
    source = opened[0] if opened else data.open_source(*source_args)  # the others, once the main built any cache
    noise_scheduler = DDPMScheduler(num_train_timesteps=config.ddpm_num_steps, beta_schedule=config.ddpm_beta_schedule,
                                    prediction_type=config.prediction_type)
    scheduler_config = json.loads(json.dumps(config_to_dict(noise_scheduler.config, "DDPMScheduler")))

    # ---- the output folder: locked, then checked, then (--overwrite_output_dir) cleared ----
    with output_folder(accelerator, config.output_dir):
        resume: tuple[Path, TrainerState] | None = None
        if config.resume_from_checkpoint is not None:
            resume = on_main(accelerator, lambda: resume_module.choose_checkpoint(
                config.output_dir, config.resume_from_checkpoint or "", unet_config, scheduler_config, config.use_ema))
            if resume is None:
                say(accelerator, f"no checkpoint in {config.output_dir} yet: starting a new training run")
        doomed = on_main(accelerator, lambda: outputs.check_output_dir(config, unet_config, resume is not None,
                                                                        scheduler_config))
        repo_id = on_main(accelerator, lambda: outputs.create_hub_repo(config)) if config.push_to_hub else None
        if doomed and accelerator.is_main_process:
            outputs.delete(doomed)
            say(accelerator, f"--overwrite_output_dir: deleted {', '.join(p.name for p in doomed)} in "
                f"{config.output_dir}")
        accelerator.wait_for_everyone()
        return _run(config, accelerator, stop, unet_config, source, rows, noise_scheduler, resume, repo_id)


def _run(config: TrainConfig, accelerator: Accelerator, stop: StopRequest, unet_config: dict[str, Any],
         source: data.ImageSource, rows: list[int], noise_scheduler: DDPMScheduler,
         resume: tuple[Path, TrainerState] | None, repo_id: str | None) -> TrainResult:
    is_main = accelerator.is_main_process
    resumed = resume[1] if resume is not None else None
    seed = config.seed if config.seed is not None else (resumed.seed if resumed is not None else None)
    if seed is None:
        seed = on_main(accelerator, lambda: secrets.randbelow(2**31))
        say(accelerator, f"seed {seed} (pass --seed {seed} to repeat this run)")
    elif resumed is not None and resumed.seed != seed:
        log.warning("warning: --seed %s differs from the checkpoint's seed %s: the data order will not continue "
                    "the original run's", seed, resumed.seed)

    # ---- model, optimiser, data loader ----
    set_seed(seed)  # the same initial weights on every process
    model = UNet.from_config(unet_config)
    set_seed(seed, device_specific=True)  # then different noise on each process
    # (on CPU the fused kernel; a checkpoint's own choice wins on resume, so a resumed run steps as it began)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
                                  fused=True if cpu.training_on_cpu(accelerator.device) else None)
    preprocess = data.Preprocess(config.resolution, config.center_crop, config.random_flip,
                                 channels=model.config.in_channels,
                                 preserve_input_precision=config.preserve_input_precision)
    dataset = TrainDataset(source, rows, preprocess, seed)
    sampler = EpochSampler(len(dataset), seed)
    train_dataloader = DataLoader(dataset, batch_size=config.train_batch_size, sampler=sampler,
                                  num_workers=config.dataloader_num_workers,
                                  persistent_workers=config.dataloader_num_workers > 0,  # workers keep their cache
                                  generator=torch.Generator().manual_seed(seed))  # never the global RNG
    model, optimizer_wrapped, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    batches_per_epoch = len(train_dataloader)  # per process
    updates_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or config.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    # The LR schedule counts optimiser steps; it is stepped by hand, once per optimiser step.
    lr_schedule = get_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, max_train_steps)
    unwrapped: UNet = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, config.ema_max_decay, config.ema_inv_gamma, config.ema_power) \
        if config.use_ema and is_main else None
    objects = TrainingObjects(unwrapped, optimizer, lr_schedule, accelerator.scaler, ema, noise_scheduler)
    ends = _EpochEnd(config, accelerator, noise_scheduler, repo_id)

    # ---- resume ----
    global_step, first_epoch, skip_batches, nan_skips = 0, 0, 0, 0
    last_checkpoint = str(resume[0]) if resume is not None else None
    if resume is not None:
        path, state = resume
        resume_module.load_checkpoint(path, state, objects, accelerator.process_index)
        global_step, nan_skips = state.global_step, state.nan_skips
        if (state.batches_per_epoch, state.gradient_accumulation_steps, state.num_processes) != \
                (batches_per_epoch, config.gradient_accumulation_steps, accelerator.num_processes):
            log.warning("warning: %s was written with %s batches per epoch, accumulation %s and %s processes; this "
                        "run has %s, %s and %s (data, batch size or launch changed): the data order will not "
                        "continue exactly", path.name, state.batches_per_epoch, state.gradient_accumulation_steps,
                        state.num_processes, batches_per_epoch, config.gradient_accumulation_steps,
                        accelerator.num_processes)
        if global_step >= max_train_steps:
            return _already_complete(config, accelerator, objects, ends, path, state, max_train_steps)
        if is_main:
            for old, new in checkpoints.set_aside_newer(config.output_dir, global_step):
                log.warning("warning: %s is newer than the checkpoint resumed from: renamed to %s (kept, but no "
                            "longer pruned or picked by 'latest')", old.name, new.name)
        accelerator.wait_for_everyone()
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * config.gradient_accumulation_steps
        say(accelerator, f"resumed from {path} at step {global_step} (epoch {first_epoch}, skipping {skip_batches} "
            f"batches already seen)")

    accelerator.init_trackers(outputs.TRACKER_PROJECT, config=config_for_logging(config))
    say(accelerator,
        f"***** training *****\n  examples = {len(dataset)} ({source.description or data.EMBEDDED_NAME})\n"
        f"  epochs = {num_epochs}, batches per epoch per process = {batches_per_epoch}\n"
        f"  batch size per process = {config.train_batch_size}, processes = {accelerator.num_processes}, "
        f"accumulation = {config.gradient_accumulation_steps}\n"
        f"  optimisation steps = {max_train_steps}, parameters = {sum(p.numel() for p in unwrapped.parameters()):,}")

    def checkpoint(epoch: int) -> str:
        _check_finite_weights(accelerator, objects, global_step, last_checkpoint)
        state = TrainerState(
            global_step=global_step, epoch=epoch, seed=seed, nan_skips=nan_skips, batches_per_epoch=batches_per_epoch,
            gradient_accumulation_steps=config.gradient_accumulation_steps, num_processes=accelerator.num_processes,
            lr_schedule=lr_schedule.state_dict(),
            optimizer_param_groups=checkpoints.optimizer_param_groups(unwrapped, optimizer),
            grad_scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            ema_optimization_step=ema.optimization_step if ema is not None else None)
        path = checkpoints.save_checkpoint(accelerator, config.output_dir, global_step, state, objects)
        if is_main:
            for old in checkpoints.prune_checkpoints(config.output_dir, config.checkpoints_total_limit):
                log.info("removed %s (--checkpoints_total_limit %s)", old, config.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        return str(path)

    # ---- the loop ----
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)  # for the loss weights, moved once
    start = time.monotonic()
    with tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
              desc="steps", dynamic_ncols=True) as progress, cpu.reuse_freed_memory(accelerator.device):
        epoch, first_batch = first_epoch, True
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
                if first_batch and config.debug:  # a record of each process's shard, for checking launches
                    tqdm.write(f"ddpm.train: process {accelerator.process_index}/{accelerator.num_processes}: first "
                               f"batch of epoch {epoch} holds rows {batch['index'].tolist()}", file=sys.stderr)
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
                        window_finite = False
                        nan_skips = _skip(config, "loss", mean_loss, global_step + 1, nan_skips, last_checkpoint)
                    if accelerator.sync_gradients and window_finite:
                        norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                        # (with fp16 the grad scaler skips steps with infinite gradients by itself)
                        if norm is not None and config.mixed_precision != "fp16" and not math.isfinite(float(norm)):
                            window_finite = False  # the norm is all-reduced: every process skips alike
                            nan_skips = _skip(config, "gradient norm", float(norm), global_step + 1, nan_skips,
                                              last_checkpoint)
                        else:
                            optimizer_wrapped.step()
                    optimizer_wrapped.zero_grad()

                if not accelerator.sync_gradients:
                    continue
                # ---- one optimiser step done ----
                # (a window with a non-finite loss or gradient took no step; zero_grad dropped its gradients)
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
                progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)

                stopping = any_process(accelerator, stop.requested)
                finished = global_step >= max_train_steps
                if global_step % config.checkpointing_steps == 0 or stopping or finished:
                    last_checkpoint = checkpoint(epoch)  # the final one when finished: a resume then trains nothing
                if stopping:
                    return _interrupted(accelerator, config, global_step, epoch, last_checkpoint or "",
                                        stop.signal_name or "a signal")
                if finished:
                    break

            # ---- end of epoch: grids, scores and the pipeline on the main process ----
            accelerator.wait_for_everyone()
            last = epoch == num_epochs - 1 or global_step >= max_train_steps
            ends(unwrapped, ema, epoch, global_step, last, last_checkpoint)
            if last:
                break
    took = f"this run took {_duration(time.monotonic() - start)}"
    say(accelerator, _summary(config, global_step, last_checkpoint, took))
    accelerator.wait_for_everyone()  # before end_training: without it gloo can abort at exit
    return TrainResult(config.output_dir, global_step, epoch, last_checkpoint)


def _already_complete(config: TrainConfig, accelerator: Accelerator, objects: TrainingObjects, ends: _EpochEnd,
                      path: Path, state: TrainerState, max_train_steps: int) -> TrainResult:
    """A resume at or past the last step. It trains nothing; if the run was stopped after its final checkpoint
    but before its final pipeline was saved, it saves that pipeline (with the grid and scores due). Otherwise
    it writes nothing at all."""
    step = state.global_step
    complete = checkpoints.complete_checkpoints(config.output_dir)
    newest = bool(complete) and complete[-1][1].resolve() == path.resolve()
    if step > max_train_steps or not newest:
        say(accelerator, f"nothing to train: {path.name} is at step {step}, and --max_train_steps (or --num_epochs) "
            f"ends the run at step {max_train_steps}; the pipeline in {config.output_dir} is left as "
            f"it is")
        return TrainResult(config.output_dir, step, state.epoch, str(path))
    staged: outputs.StagedPipeline | None = None
    if accelerator.is_main_process:
        eval_unet = _eval_unet(objects.model, objects.ema)
        staged = outputs.StagedPipeline(_final_pipeline(eval_unet, objects.noise_scheduler), config.output_dir)
    changed = on_main(accelerator, lambda: staged is not None and staged.changed)
    if not changed:
        if staged is not None:
            staged.discard()
        say(accelerator, f"the run is already complete ({step} of {max_train_steps} steps): nothing to do")
        say(accelerator, _summary(config, step, str(path), "finished earlier"))
        return TrainResult(config.output_dir, step, state.epoch, str(path))
    say(accelerator, f"{path.name} is the last step, but the run stopped before its final pipeline was saved: "
        f"saving it now")
    if staged is not None:
        staged.discard()
    accelerator.init_trackers(outputs.TRACKER_PROJECT, config=config_for_logging(config))
    ends(objects.model, objects.ema, state.epoch, step, True, str(path))
    say(accelerator, _summary(config, step, str(path), "finished now"))
    accelerator.wait_for_everyone()
    return TrainResult(config.output_dir, step, state.epoch, str(path))


class _EpochEnd:
    """What happens at the end of an epoch, on the main process: a sample grid, scores, and the pipeline,
    in that order. The pipeline is saved last (staged first, swapped in at the end), so a pipeline that holds
    the final weights means the run's outputs are complete."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, noise_scheduler: DDPMScheduler,
                 repo_id: str | None) -> None:
        self.config, self.accelerator, self.noise_scheduler = config, accelerator, noise_scheduler
        self.repo_id = repo_id
        self.scorer: Scorer | None = None  # --eval_epochs: built on first use

    def __call__(self, unwrapped: UNet, ema: EMA | None, epoch: int, global_step: int, last: bool,
                 last_checkpoint: str | None) -> None:
        config, accelerator = self.config, self.accelerator
        grid = epoch % config.save_images_epochs == 0 or last
        score = bool(config.eval_epochs) and (epoch % config.eval_epochs == 0 or last)
        save = epoch % config.save_model_epochs == 0 or last
        if accelerator.is_main_process and (grid or score or save):
            eval_unet = _eval_unet(unwrapped, ema)  # one copy (EMA weights if on) serves all three
            staged = None
            if save:
                if not _finite(eval_unet.parameters()):
                    raise _weights_not_finite(global_step, last_checkpoint)
                staged = outputs.StagedPipeline(_final_pipeline(eval_unet, self.noise_scheduler), config.output_dir)
            try:
                if grid:
                    sample_grid(config, accelerator, eval_unet, self.noise_scheduler, epoch, global_step)
                if score:
                    self.scorer = self.scorer or Scorer(config, unwrapped.config, accelerator.device)
                    self.scorer(eval_unet, self.noise_scheduler, global_step, accelerator)
            except BaseException:
                if staged is not None:
                    staged.discard()
                raise
            if staged is not None:
                staged.commit()
                if self.repo_id is not None:
                    outputs.upload_to_hub(config, self.repo_id, f"Epoch {epoch}")
        accelerator.wait_for_everyone()


# ---- helpers ------------------------------------------------------------------------------------------------


def _check_environment(config: TrainConfig) -> None:
    import importlib.util

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU: on CPU accelerate would silently train in fp32. "
                         "Use --mixed_precision bf16 (works on CPU) or no")
    module = config.logger  # the package is named like the logger
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"--logger {config.logger} needs the {module} package: pip install {module}")


def _skip(config: TrainConfig, what: str, value: float, step: int, nan_skips: int, last_checkpoint: str | None) -> int:
    """Count one optimiser step skipped for a non-finite ``what``; stop when --max_nan_skips is used up."""
    nan_skips += 1
    if nan_skips > config.max_nan_skips:
        kept = f"the last good checkpoint, {last_checkpoint}, is kept" if last_checkpoint else \
            "no checkpoint was written"
        precision = " (fp16 overflows easily: try bf16 or no)" if config.mixed_precision == "fp16" else ""
        raise NonFiniteError(f"{what} is {value} at step {step}: stopping ({kept}). Lower --learning_rate (now "
                             f"{config.learning_rate}), check --mixed_precision{precision}, or skip a few bad batches "
                             f"with --max_nan_skips K")
    log.warning("warning: %s is %s at step %d: skipping this optimiser step (%d of --max_nan_skips %d used)", what,
                value, step, nan_skips, config.max_nan_skips)
    return nan_skips


def _finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _weights_not_finite(step: int, last_checkpoint: str | None) -> NonFiniteError:
    kept = f"the last good checkpoint, {last_checkpoint}, is kept" if last_checkpoint else "nothing is saved"
    return NonFiniteError(f"the weights hold NaN or infinity at step {step}: stopping before they are saved "
                          f"({kept}). Lower --learning_rate or check --mixed_precision")


def _check_finite_weights(accelerator: Accelerator, objects: TrainingObjects, step: int,
                          last_checkpoint: str | None) -> None:
    """A checkpoint only ever holds finite weights, so "the last good checkpoint" is good. Every process agrees
    (the EMA lives on the main process only)."""
    ema = objects.ema.shadow.values() if objects.ema is not None else []
    if any_process(accelerator, not _finite([*objects.model.parameters(), *ema])):
        raise _weights_not_finite(step, last_checkpoint)


def _interrupted(accelerator: Accelerator, config: TrainConfig, step: int, epoch: int, checkpoint: str,
                 signal_name: str) -> TrainResult:
    say(accelerator, f"ddpm.train: stopped by {signal_name} at step {step}; saved {checkpoint}. Resume with the "
        f"same flags plus --resume_from_checkpoint latest")
    accelerator.wait_for_everyone()
    return TrainResult(config.output_dir, step, epoch, checkpoint, stopped_by=signal_name)


def _summary(config: TrainConfig, step: int, checkpoint: str | None, when: str) -> str:
    out = Path(config.output_dir)
    grids = sorted((out / "samples").glob("epoch_*.png"))
    weights = "EMA weights" if config.use_ema else "raw weights"
    lines = [f"done: {step} steps ({when})",
             f"  pipeline    {out}  ({weights}; diffusers.DDPMPipeline.from_pretrained loads it too)",
             f"  checkpoint  {checkpoint}",
             f"  samples     {grids[-1] if grids else out / 'samples'}",
             f"  logs        tensorboard --logdir {shlex.quote(str(out / config.logging_dir))}",
             f"  next        python -m ddpm.sample --model {shlex.quote(str(out))} --num_images 16 --output "
             f"{shlex.quote(str(out / 'generated'))}"]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _eval_unet(unwrapped: UNet, ema: EMA | None) -> UNet:
    """A separate copy of the model for sampling and saving, holding the EMA weights when EMA is on."""
    with torch.device("meta"):
        copy = UNet(unwrapped.config)
    copy.load_state_dict({k: v.detach().clone() for k, v in unwrapped.state_dict().items()}, assign=True)
    if ema is not None:
        ema.copy_to(copy)
    return copy.eval()


def _final_pipeline(unet: UNet, noise_scheduler: DDPMScheduler) -> Pipeline:
    # The saved pipeline keeps the training DDPMScheduler, whatever --ddpm_inference_scheduler the grids use
    return Pipeline(unet=unet, scheduler=DDPMScheduler.from_config(noise_scheduler.config))


