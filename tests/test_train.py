"""``python -m ddpm.train`` and ``ddpm.training``: end to end on a generated image folder with a tiny UNet, resume,
multi-process, mixed precision, the loss maths, the LR schedules and the one-line errors."""

import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddpm.training import TrainConfig, parse_args, train
from ddpm.training import loop as loop_module
from ddpm.training import outputs
from ddpm.training.args import LAPTOP_PROFILE, SCRIPT_PROFILE, SMALL_UNET_CONFIG, build_parser
from ddpm.training.loss import diffusion_loss, loss_weights, training_target
from ddpm.training.lr import get_scheduler as our_get_scheduler
from helpers import TINY_UNET, write_training_files

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"  # in a checkpoint: the raw weights
EMA_WEIGHTS = "unet_ema/diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def one_thread():
    """Several training processes share 2 cores in CI: one torch thread each avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """24 random RGB images of 20x18 (non-square: random crops matter), one corrupt file, a tiny UNet config."""
    root = tmp_path_factory.mktemp("train")
    images, config = write_training_files(root, count=24, size=(20, 18), seed=0)
    corrupt = root / "with_corrupt"
    corrupt.mkdir()
    for p in images.iterdir():
        (corrupt / p.name).write_bytes(p.read_bytes())
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return {"root": root, "images": images, "corrupt": corrupt, "config": config}


def tiny_flags(files):
    return ["--model_config_name_or_path", files["config"], "--resolution", 16, "--train_batch_size", 4,
            "--ddpm_num_steps", 50, "--ddpm_num_inference_steps", 2, "--eval_batch_size", 2, "--seed", 0]


def tiny_config(files, output_dir, **overrides):
    base = dict(train_data_dir=str(files["images"]), model_config_name_or_path=str(files["config"]), resolution=16,
                train_batch_size=4, ddpm_num_steps=50, ddpm_num_inference_steps=2, eval_batch_size=2, seed=0,
                output_dir=str(output_dir), save_images_epochs=100, save_model_epochs=100, lr_warmup_steps=2,
                cache_dir=str(files["root"] / "hf-cache"))
    base.update(overrides)
    return TrainConfig(**base)


def run_cli(*args, launcher=(sys.executable, "-m", "ddpm.train"), env=None, cwd=None, timeout=240):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd)


def no_accelerate_config(tmp_path):
    """An empty HF_HOME: no accelerate config file exists, as on a fresh machine."""
    home = tmp_path / "hf-home"
    home.mkdir(exist_ok=True)
    return {"HF_HOME": str(home)}


# ---- end to end ---------------------------------------------------------------------------------------------


def test_end_to_end_cli(files, tmp_path):
    out = tmp_path / "out"
    r = run_cli("--train_data_dir", files["corrupt"], *tiny_flags(files), "--output_dir", out, "--num_epochs", 2,
                "--use_ema", "--checkpointing_steps", 4, "--checkpoints_total_limit", 2, "--save_images_epochs", 1,
                "--lr_warmup_steps", 2, env=no_accelerate_config(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "broken.png" in r.stderr  # the corrupt image is named and skipped
    assert "12/12" in r.stderr  # tqdm: 24 images / 4 = 6 steps per epoch, 2 epochs
    assert "holds rows" not in r.stderr + r.stdout  # no row dump without --debug
    assert "sample grid" in r.stderr  # the grids have their own (nested) bar
    # One summary at the end: where things are, and the next command.
    summary = r.stdout[r.stdout.index("done: 12 steps"):]
    assert f"pipeline    {out}" in summary and f"checkpoint  {out / 'checkpoint-12'}" in summary
    assert f"samples     {out / 'samples' / 'epoch_0001.png'}" in summary
    assert f"tensorboard --logdir {out / 'logs'}" in summary
    assert f"python -m ddpm.sample --model {out} " in summary

    for name in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"]:
        assert (out / name).is_file(), name
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-12", "checkpoint-8"]  # 4 was pruned by --checkpoints_total_limit 2
    assert all((out / c / "COMPLETE").is_file() for c in checkpoints)
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".ddpm-train.lock*"))
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert grids == ["epoch_0000.png", "epoch_0001.png"]
    assert Image.open(out / "samples" / "epoch_0001.png").size == (32, 16)  # 2 images of 16x16 side by side
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and state["epoch"] == 1 and state["ema_optimization_step"] == 12

    # The checkpoint is in train_unconditional.py's layout, with no pickle: diffusers loads its weights.
    ckpt = out / "checkpoint-12"
    files = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    assert files == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet_ema/config.json",
                     "unet_ema/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                     "optimizer.safetensors", "rng_state_0.safetensors", "trainer_state.json", "COMPLETE"}
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    raw_unet = UNet2DModel.from_pretrained(ckpt, subfolder="unet")
    ema_model = EMAModel.from_pretrained(ckpt / "unet_ema", model_cls=UNet2DModel)
    assert ema_model.optimization_step == 12 and ema_model.decay == 0.9999 and ema_model.use_ema_warmup
    assert DDPMScheduler.from_pretrained(ckpt, subfolder="scheduler").config.num_train_timesteps == 50

    # The pipeline holds the EMA weights, not the raw ones.
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    names = [name for name, _ in raw_unet.named_parameters()]
    ema = dict(zip(names, ema_model.shadow_params))
    raw = dict(raw_unet.named_parameters())
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    assert any(not torch.equal(saved[k], raw[k]) for k in raw)

    # diffusers loads and runs it.
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(out)
    assert type(pipe.unet).__name__ == "UNet2DModel" and pipe.unet.config.sample_size == 16
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    # The tensorboard log records loss, lr and the EMA decay per optimiser step, and the sample grids.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "train_unconditional"))
    events.Reload()
    assert {"loss", "lr", "ema_decay"} <= set(events.Tags()["scalars"])
    decay = {e.step: e.value for e in events.Scalars("ema_decay")}
    assert decay[1] == 0.0 and decay[2] == pytest.approx(1 - 2 ** -0.75) and len(decay) == 12
    lr = {e.step: e.value for e in events.Scalars("lr")}
    assert lr[1] == pytest.approx(0.5e-4)  # cosine with 2 warmup steps: after one step, half of 1e-4
    assert "test_samples" in events.Tags()["images"]


def test_resume_latest_is_bitwise_equal_to_a_straight_run(files, tmp_path):
    # Gradient accumulation 2 and random crops + flips; the resume lands mid-epoch (step 4 of 3 per epoch).
    kwargs = dict(use_ema=True, checkpointing_steps=4, gradient_accumulation_steps=2, random_flip=True,
                  lr_scheduler="constant_with_warmup", learning_rate=1e-3)
    straight = train(tiny_config(files, tmp_path / "a", max_train_steps=8, **kwargs))
    half = train(tiny_config(files, tmp_path / "b", max_train_steps=4, **kwargs))
    resumed = train(tiny_config(files, tmp_path / "b", max_train_steps=8, resume_from_checkpoint="latest", **kwargs))
    assert (straight.global_step, half.global_step, resumed.global_step) == (8, 4, 8)
    for name in [WEIGHTS, EMA_WEIGHTS, "optimizer.safetensors"]:
        a, b = load_file(tmp_path / "a" / "checkpoint-8" / name), load_file(tmp_path / "b" / "checkpoint-8" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    first, last = (load_file(tmp_path / "b" / f"checkpoint-{step}" / WEIGHTS) for step in (4, 8))
    assert any(not torch.equal(first[k], last[k]) for k in last)  # it really trained after resuming


def test_cpu_training_uses_fused_adamw_and_keeps_freed_memory_unless_the_kernels_are_off(files, tmp_path,
                                                                                        monkeypatch):
    """On CPU with the kernels on, the trainer steps with torch's fused AdamW (recorded in the checkpoint's
    optimiser groups) and trains inside ddpm.training.cpu.reuse_freed_memory; DDPM_CPU_KERNELS=0 (enabled(False))
    turns both off. The weights agree with an unfused AdamW run to float32 rounding."""
    from ddpm import kernels
    from ddpm.training import cpu as train_cpu

    seen, real = [], train_cpu.reuse_freed_memory

    @contextlib.contextmanager
    def spy(device):
        with real(device) as kept:
            seen.append((device.type, kept))
            yield kept

    monkeypatch.setattr(train_cpu, "reuse_freed_memory", spy)
    train(tiny_config(files, tmp_path / "on", max_train_steps=3, checkpointing_steps=3))
    with kernels.enabled(False):
        train(tiny_config(files, tmp_path / "off", max_train_steps=3, checkpointing_steps=3))
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert seen == [("cpu", glibc and not any(v in os.environ for v in train_cpu._ALLOCATOR_ENV)), ("cpu", False)]
    groups = {run: json.loads((tmp_path / run / "checkpoint-3" / "trainer_state.json").read_text())
              ["optimizer_param_groups"] for run in ("on", "off")}
    assert [g["fused"] for g in groups["on"]] == [True] and [g["fused"] for g in groups["off"]] == [None]
    on, off = (load_file(tmp_path / run / "checkpoint-3" / WEIGHTS) for run in ("on", "off"))
    assert max(float((on[k] - off[k]).abs().max()) for k in on) < 1e-5


def test_bundled_dataset_run_with_laptop_defaults(tmp_path, capsys):
    config = parse_args(["--output_dir", str(tmp_path / "fm"), "--max_train_steps", "2", "--train_batch_size", "8",
                         "--resolution", "16", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2"])
    assert config.uses_embedded_data and config.learning_rate == LAPTOP_PROFILE["learning_rate"]
    result = train(config)
    assert result.global_step == 2
    hint = [line for line in capsys.readouterr().out.splitlines() if "no dataset flag" in line]
    assert len(hint) == 1 and len(hint[0]) <= 100 and "laptop profile" in hint[0]  # a hint of one line
    unet_config = json.loads((tmp_path / "fm" / "unet" / "config.json").read_text())
    assert unet_config["in_channels"] == 1 and unet_config["block_out_channels"] == [16, 32, 64]
    grid = Image.open(tmp_path / "fm" / "samples" / "epoch_0000.png")
    assert grid.mode == "L" and grid.size == (32, 16)


def test_eval_epochs_scores_samples_during_training(tmp_path):
    """--eval_epochs: ddpm.metrics on the bundled data, logged to metrics.jsonl and the run's tensorboard."""
    out = tmp_path / "ev"
    config = parse_args(["--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "8",
                         "--resolution", "16", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "4",
                         "--eval_epochs", "1", "--eval_num_images", "8", "--eval_extractor_steps", "3"])
    train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 2 and records[0]["num_images"] == 8
    assert records[0]["fd"] > 0 and 0 <= records[0]["precision"] <= 1 and 0 <= records[0]["recall"] <= 1
    assert list((out / "feature_extractors").glob("*.safetensors")), "the feature network is cached"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(str(p.parent)).Reload() for p in (out / "logs").rglob("events.out.tfevents.*")]
    assert any("eval/fd" in e.Tags()["scalars"] for e in events)


def test_notebook_launcher_runs_train(files, tmp_path):
    from accelerate import notebook_launcher

    config = tiny_config(files, tmp_path / "nb", max_train_steps=2, save_model_epochs=1)
    notebook_launcher(train, (config,), num_processes=1)
    assert (tmp_path / "nb" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_two_processes_on_cpu_share_the_work(files, tmp_path):
    out = tmp_path / "mp"
    with socket.socket() as probe:  # a free port for the gloo rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(port), "-m", "ddpm.train")
    r = run_cli("--train_data_dir", files["images"], *tiny_flags(files), "--output_dir", out, "--num_epochs", 1,
                "--use_ema", "--checkpointing_steps", 3, "--debug", launcher=launcher,
                env=no_accelerate_config(tmp_path), timeout=400)
    assert r.returncode == 0, "\n".join(line for line in r.stderr.splitlines() if "it/s]" not in line)[-3000:]
    assert "Traceback" not in r.stderr
    rows = {int(m.group(1)): set(json.loads(m.group(2)))
            for m in re.finditer(r"process (\d)/2: first batch of epoch 0 holds rows (\[[\d, ]*\])", r.stderr)}
    assert rows.keys() == {0, 1} and not rows[0] & rows[1]  # different shards
    assert "batches per epoch per process = 3" in r.stdout  # 24 images / (4 x 2 processes)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    ckpt = out / "checkpoint-3"
    assert (ckpt / "COMPLETE").is_file()
    assert (ckpt / "rng_state_0.safetensors").is_file() and (ckpt / "rng_state_1.safetensors").is_file()
    assert len(list(out.glob("checkpoint-*"))) == 1 and len(list((out / "samples").glob("*.png"))) == 1


def test_bf16_on_cpu_matches_a_hand_written_autocast_step(files, tmp_path, monkeypatch):
    """--mixed_precision bf16 against the same optimiser steps written in plain PyTorch (torch.autocast around
    the UNet, the loss in float32, clip_grad_norm_, AdamW): the same weights. The same steps without autocast
    give other weights, so the comparison sees the precision."""
    init, inputs, seen = {}, [], []
    real_loss, real_from_config = loop_module.diffusion_loss, loop_module.UNet.from_config

    def from_config(config):
        model = real_from_config(config)
        init.update({k: v.clone() for k, v in model.state_dict().items()})
        model.conv_in.register_forward_hook(lambda module, args, out: seen.append(("conv", out.dtype)))
        return model

    def loss(prediction, clean, noise, timesteps, *args, **kwargs):
        inputs.append((clean.clone(), noise.clone(), timesteps.clone()))
        value = real_loss(prediction, clean, noise, timesteps, *args, **kwargs)
        seen.append(("loss", value.dtype))
        return value

    monkeypatch.setattr(loop_module.UNet, "from_config", from_config)
    monkeypatch.setattr(loop_module, "diffusion_loss", loss)
    hyper = dict(learning_rate=1e-3, lr_scheduler="constant", adam_beta1=0.9, adam_beta2=0.99,
                 adam_weight_decay=1e-2, adam_epsilon=1e-8)
    result = train(tiny_config(files, tmp_path / "bf16", max_train_steps=3, mixed_precision="bf16",
                               checkpointing_steps=3, **hyper))
    assert result.global_step == 3 and len(inputs) == 3
    # The UNet ran under bf16 autocast; the loss is float32.
    assert seen == [("conv", torch.bfloat16), ("loss", torch.float32)] * 3
    trained = load_file(tmp_path / "bf16" / "checkpoint-3" / WEIGHTS)
    assert all(w.dtype == torch.float32 for w in trained.values())  # the parameters stay float32

    from diffusers import DDPMScheduler as ReferenceScheduler

    from ddpm import UNet

    monkeypatch.undo()

    def by_hand(autocast):
        unet = UNet.from_config(outputs.model_config(tiny_config(files, tmp_path)))
        unet.load_state_dict(init)
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-8)
        scheduler = ReferenceScheduler(num_train_timesteps=50)
        for clean, noise, t in inputs:
            noisy = scheduler.add_noise(clean, noise, t)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                prediction = unet(noisy, t).sample
            per_sample = ((prediction.float() - noise) ** 2).mean(dim=(1, 2, 3))
            per_sample.mean().backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return {k: v.detach() for k, v in unet.state_dict().items()}

    bf16, fp32 = by_hand(autocast=True), by_hand(autocast=False)
    gap = max(float((trained[k] - bf16[k]).abs().max()) for k in trained)
    fp32_gap = max(float((trained[k] - fp32[k]).abs().max()) for k in trained)
    assert gap <= 1e-6 < fp32_gap, (gap, fp32_gap)


def test_non_finite_loss_stops_with_the_step_or_is_skipped(files, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop_module.diffusion_loss

    def nan_on_third_call(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop_module, "diffusion_loss", nan_on_third_call)
    with pytest.raises(loop_module.NonFiniteError, match=r"loss is nan at step 3: .*checkpoint-2.*learning_rate") as info:
        train(tiny_config(files, tmp_path / "nan", max_train_steps=5, checkpointing_steps=1))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "nan").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    calls["n"] = 0
    result = train(tiny_config(files, tmp_path / "skip", max_train_steps=5, checkpointing_steps=5, max_nan_skips=1))
    assert result.global_step == 5
    state = json.loads((tmp_path / "skip" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["nan_skips"] == 1


class _NanGradient(torch.autograd.Function):
    """The identity forward, NaN gradients backward: a finite loss whose step would make the weights NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradients_never_reach_a_checkpoint(files, tmp_path, monkeypatch):
    """Issue 13: NaN detection checked only the loss, so the checkpoint it named as the last good one could hold
    NaN weights. A finite loss with NaN gradients at step 2 now stops before the step, naming checkpoint-1, and
    every checkpoint left holds finite weights."""
    calls = {"n": 0}
    real = loop_module.diffusion_loss

    def nan_gradients_on_second_call(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return _NanGradient.apply(loss) if calls["n"] == 2 else loss

    monkeypatch.setattr(loop_module, "diffusion_loss", nan_gradients_on_second_call)
    out = tmp_path / "nan-grad"
    with pytest.raises(loop_module.NonFiniteError, match=r"gradient norm is nan at step 2: .*checkpoint-1, is kept"):
        train(tiny_config(files, out, max_train_steps=4, checkpointing_steps=1, use_ema=True))
    left = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in left] == ["checkpoint-1"]
    for name in (WEIGHTS, EMA_WEIGHTS):
        assert all(torch.isfinite(w).all() for w in load_file(left[0] / name).values())


def test_push_to_hub_creates_a_private_repo(files, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class Repo:
        repo_id = "me/tiny"

    class Api:
        def __init__(self, token=None):
            pass

        def repo_info(self, repo_id):
            calls.append(("repo_info", repo_id))
            return type("Info", (), {"private": True})()

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)) or Repo())
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    train(tiny_config(files, tmp_path / "tiny", max_train_steps=2, push_to_hub=True, hub_private_repo=True,
                      save_model_epochs=1))
    create = [c for c in calls if c[0] == "create"]
    assert create == [("create", "tiny", {"exist_ok": True, "private": True, "token": None})]
    uploads = [c[1] for c in calls if c[0] == "upload"]
    assert uploads and uploads[0]["repo_id"] == "me/tiny" and uploads[0]["folder_path"] == str(tmp_path / "tiny")
    assert "checkpoint-*" in uploads[0]["ignore_patterns"]


def test_output_dir_of_another_run_is_refused_unless_overwritten(files, tmp_path):
    out = tmp_path / "taken"
    (out / "unet").mkdir(parents=True)
    (out / "model_index.json").write_text("{}")
    (out / "unet" / "config.json").write_text(json.dumps({**TINY_UNET, "block_out_channels": [8, 8]}))
    config = tiny_config(files, out)
    unet_config = outputs.model_config(config)
    with pytest.raises(ValueError, match="different model config.*block_out_channels.*--overwrite_output_dir"):
        outputs.check_output_dir(config, unet_config, resuming=False)
    (out / "unet" / "config.json").write_text(json.dumps({**TINY_UNET, "sample_size": 16}))  # the same model
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    with pytest.raises(ValueError, match="noise schedule.*num_train_timesteps"):
        outputs.check_output_dir(config, unet_config, False, {"num_train_timesteps": 50})
    outputs.check_output_dir(config, unet_config, False, {"num_train_timesteps": 1000})  # the same: allowed
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "COMPLETE").write_text("")
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume_from_checkpoint latest"):
        outputs.check_output_dir(config, unet_config, resuming=False)
    doomed = outputs.check_output_dir(tiny_config(files, out, overwrite_output_dir=True), unet_config, resuming=False)
    assert (out / "checkpoint-3").exists() and (out / "unet").exists()  # the check deletes nothing
    assert sorted(p.name for p in doomed) == ["checkpoint-3", "model_index.json", "scheduler", "unet"]
    outputs.delete(doomed)
    assert not (out / "checkpoint-3").exists() and not (out / "unet").exists()


# ---- flags ----------------------------------------------------------------------------------------------------


def test_flags_keep_the_script_defaults_and_the_embedded_profile_fills_unset_ones():
    script = parse_args(["--train_data_dir", "x"])
    assert script.profile == "train_unconditional"
    assert (script.resolution, script.output_dir, script.train_batch_size, script.num_epochs) == (64, "ddpm-model-64", 16, 100)
    assert (script.learning_rate, script.lr_scheduler, script.lr_warmup_steps, script.adam_beta1) == (1e-4, "cosine", 500, 0.95)
    assert (script.ema_power, script.ema_max_decay, script.use_ema, script.checkpointing_steps) == (0.75, 0.9999, False, 500)
    assert script.model_config_name_or_path is None and script.ddpm_num_inference_steps == 1000
    laptop = parse_args([])
    assert laptop.profile == "laptop" and laptop.resolution == LAPTOP_PROFILE["resolution"] and laptop.uses_embedded_data
    assert laptop.model_config_name_or_path == str(SMALL_UNET_CONFIG) and SMALL_UNET_CONFIG.is_file()
    mixed = parse_args(["--resolution", "16", "--num_epochs", "1", "--use_ema"])
    assert (mixed.resolution, mixed.num_epochs, mixed.use_ema) == (16, 1, True)
    assert mixed.train_batch_size == LAPTOP_PROFILE["train_batch_size"]
    assert parse_args(["--dataset_name", "a/b", "--local_rank", "3"]).local_rank == 3
    accepted = parse_args(["--train_data_dir", "x", "--enable_xformers_memory_efficient_attention",
                           "--preserve_input_precision", "--prediction_type", "v_prediction", "--snr_gamma", "5"])
    assert accepted.prediction_type == "v_prediction" and accepted.snr_gamma == 5.0
    # --profile laptop on your own images: the same small UNet, in RGB.
    own = parse_args(["--train_data_dir", "x", "--profile", "laptop", "--seed", "3"])
    assert (own.profile, own.resolution, own.seed, own.output_dir) == ("laptop", 32, 3, "ddpm-model-32")
    assert json.loads(Path(own.model_config_name_or_path).read_text())["in_channels"] == 3


def test_python_config_picks_its_profile_as_the_command_line_does():
    """Issue 14: TrainConfig(train_data_dir=...) silently built the 114M-parameter UNet; TrainConfig() trained
    it on the bundled data. Now the Python API resolves the profile exactly as the flags do."""
    for argv, kwargs in [([], {}), (["--train_data_dir", "x"], {"train_data_dir": "x"}),
                         (["--train_data_dir", "x", "--profile", "laptop"], {"train_data_dir": "x", "profile": "laptop"}),
                         (["--resolution", "16", "--seed", "5"], {"resolution": 16, "seed": 5}),
                         (["--dataset_name", "a/b", "--checkpoints_total_limit", "3"],
                          {"dataset_name": "a/b", "checkpoints_total_limit": 3})]:
        assert parse_args(argv) == TrainConfig(**kwargs), argv
    # The parser's defaults are the dataclass's, field by field (profile fields: the script's profile).
    parser = build_parser()
    for field in dataclasses.fields(TrainConfig):
        default = parser.get_default(field.name)
        expected = SCRIPT_PROFILE[field.name] if field.name in SCRIPT_PROFILE else field.default
        assert default == expected, field.name
    assert TrainConfig().model_config_name_or_path == str(SMALL_UNET_CONFIG)
    assert TrainConfig(train_data_dir="x").model_config_name_or_path is None  # the script's UNet, as the CLI
    # The quickstart's TrainConfig(train_data_dir=..., profile="laptop"): a small RGB UNet and 20-step SDE-DPM grids.
    from ddpm import UNet

    quick = TrainConfig(train_data_dir="my_images", profile="laptop", num_epochs=5, output_dir="my-model")
    unet = UNet.from_config(outputs.model_config(quick))
    assert unet.config.in_channels == 3 and sum(p.numel() for p in unet.parameters()) < 1_000_000
    assert (quick.resolution, quick.ddpm_num_inference_steps, quick.train_batch_size) == (32, 20, 64)
    assert quick.ddpm_inference_scheduler == "sde-dpm"


def test_help_shows_every_default_and_says_which_profile_applies(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    profile_line = [line for line in text.splitlines() if "No --dataset_name or --train_data_dir" in line]
    assert len(profile_line) == 1 and "laptop profile" in profile_line[0]
    flat = " ".join(text[text.index("options:"):].split())  # the flags' entries, after the usage block
    entries: dict[str, str] = {}  # flag -> its help entry (a line "  --flag ...", then deeper-indented lines)
    for line in text[text.index("options:"):].splitlines():
        header = re.match(r"^  (?:-\w, )?(--\w+)", line)
        if header:
            flag = header.group(1)
            entries[flag] = line
        elif line.startswith("   ") and entries:
            entries[flag] += " " + line.strip()
    flags = {a.option_strings[-1] for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(entries) - {"--help"}
    assert all("(default: " in entries[flag] for flag in flags), [f for f in flags if "(default: " not in entries[f]]
    assert "--resolution RESOLUTION square training size in pixels (default: 64; laptop profile: 32)" in flat
    assert "(default: None; laptop profile: ddpm/assets/unet-small.json, or ddpm/assets/unet-small-rgb.json" in flat


BAD_INPUTS = {
    "missing folder": (["--train_data_dir", "{root}/nope"], "does not exist"),
    "empty folder": (["--train_data_dir", "{root}/empty"], "is empty"),
    "no readable images": (["--train_data_dir", "{root}/junk"], "no readable images"),
    "resolution not divisible": (["--train_data_dir", "{images}", "--resolution", "15"], "must be divisible by 2"),
    "resolution vs sample_size": (["--train_data_dir", "{images}", "--model_config_name_or_path", "{root}/s8.json"],
                                  "differs from sample_size=8"),
    "unknown value": (["--train_data_dir", "{images}", "--lr_scheduler", "sometimes"], "invalid choice"),
    "unknown flag": (["--train_data_dir", "{images}", "--no_such_flag", "1"], "unrecognized arguments"),
    "zero batch": (["--train_data_dir", "{images}", "--train_batch_size", "0"], "--train_batch_size must be at least 1"),
    "fp16 on cpu": (["--train_data_dir", "{images}", "--mixed_precision", "fp16"], "needs a CUDA GPU"),
    "missing checkpoint": (["--train_data_dir", "{images}", "--resume_from_checkpoint", "checkpoint-999"],
                           "no such checkpoint"),
    "offline hub dataset": (["--dataset_name", "someone/flowers"], "--train_data_dir"),
    "missing model config": (["--train_data_dir", "{images}", "--model_config_name_or_path", "{root}/nope.json"],
                             "nope.json"),
}


def test_bad_input_is_one_line_and_a_non_zero_exit(files, tmp_path):
    """Every case of issue 4 as a real ``python -m ddpm.train`` run; the cases run concurrently to save time."""
    root = files["root"]
    (root / "empty").mkdir(exist_ok=True)
    (root / "junk").mkdir(exist_ok=True)
    (root / "junk" / "a.png").write_bytes(b"not an image")
    (root / "s8.json").write_text(json.dumps({**TINY_UNET, "sample_size": 8}))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    running = {}
    for i, (case, (flags, expected)) in enumerate(BAD_INPUTS.items()):
        flags = [f.format(root=root, images=files["images"]) for f in flags]
        if "--model_config_name_or_path" not in flags:
            flags += ["--model_config_name_or_path", str(files["config"])]
        if "--resolution" not in flags:
            flags += ["--resolution", "16"]
        flags += ["--output_dir", str(tmp_path / f"out{i}"), "--cache_dir", str(tmp_path / f"cache{i}")]
        running[case] = subprocess.Popen([sys.executable, "-m", "ddpm.train", *flags], env=env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for case, process in running.items():
        _, stderr = process.communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("ddpm.train: error:")]
        assert process.returncode == 2, (case, stderr)
        assert "Traceback" not in stderr, case
        assert len(errors) == 1 and BAD_INPUTS[case][1] in errors[0], (case, stderr)
        assert stderr.strip().splitlines()[-1] == errors[0], (case, stderr)
        assert not os.path.exists(flags[flags.index("--output_dir") + 1]), case  # nothing created
    r = run_cli("--train_data_dir", root / "nope", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "DataError" in r.stderr


# ---- the loss and the LR schedules ----------------------------------------------------------------------------


def test_v_prediction_target_and_min_snr_weights_by_hand():
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.2])  # SNR = 9, 1, 0.25
    t = torch.tensor([0, 2])
    clean = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
    noise = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0
    v = training_target("v_prediction", clean, noise, alphas_cumprod, t)
    expected_v = [math.sqrt(0.9) * 0.5 - math.sqrt(0.1) * 1.0, math.sqrt(0.2) * 2.0 - math.sqrt(0.8) * -1.0]
    torch.testing.assert_close(v.flatten(), torch.tensor(expected_v))
    from diffusers import DDPMScheduler as Reference

    reference = Reference(num_train_timesteps=3, trained_betas=[0.1, 1 - 0.5 / 0.9, 1 - 0.2 / 0.5])
    torch.testing.assert_close(reference.alphas_cumprod.float(), alphas_cumprod)
    torch.testing.assert_close(reference.get_velocity(clean, noise, t), v)

    # Min-SNR, gamma = 5: epsilon min(SNR,5)/SNR, sample min(SNR,5), v min(SNR,5)/(SNR+1)
    torch.testing.assert_close(loss_weights("epsilon", alphas_cumprod, t, 5.0), torch.tensor([5 / 9, 1.0]))
    torch.testing.assert_close(loss_weights("sample", alphas_cumprod, t, 5.0), torch.tensor([5.0, 0.25]))
    torch.testing.assert_close(loss_weights("v_prediction", alphas_cumprod, t, 5.0), torch.tensor([0.5, 0.2]))
    # Without --snr_gamma: the script's SNR weight for "sample", 1 otherwise.
    torch.testing.assert_close(loss_weights("sample", alphas_cumprod, t), torch.tensor([9.0, 0.25]))
    torch.testing.assert_close(loss_weights("v_prediction", alphas_cumprod, t), torch.ones(2))

    # A zero prediction: the loss is the weighted mean of target^2 over the batch.
    zero = torch.zeros(2, 1, 1, 1, dtype=torch.bfloat16)
    loss = diffusion_loss(zero, clean, noise, t, alphas_cumprod, "v_prediction", snr_gamma=5.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((0.5 * expected_v[0] ** 2 + 0.2 * expected_v[1] ** 2) / 2, rel=1e-6)
    loss = diffusion_loss(zero, clean, noise, t, alphas_cumprod, "epsilon", snr_gamma=5.0)
    assert loss.item() == pytest.approx((5 / 9 * 0.25 + 1.0 * 4.0) / 2, rel=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                  "constant_with_warmup"])
def test_lr_schedules_have_diffusers_shapes(name):
    from diffusers.optimization import get_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = make(opt)
        out = []
        for _ in range(14):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: our_get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=12))
    theirs = lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=12))
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[1] == pytest.approx(1e-3 / 3 if name != "constant" else 1e-3)


@pytest.mark.parametrize("name, theirs, settings", [
    ("ddpm", "DDPMScheduler", {}), ("ddim", "DDIMScheduler", {}),
    ("dpm", "DPMSolverMultistepScheduler", {}),
    ("sde-dpm", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc", "UniPCMultistepScheduler", {}), ("euler", "EulerDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
])
def test_sample_grid_samplers_on_the_training_schedule(name, theirs, settings):
    # --ddpm_inference_scheduler NAME: that sampler swapped onto the run's noise schedule, as a diffusers user swaps
    # it with from_config (same timesteps).
    import diffusers

    from ddpm.schedulers import DDPMScheduler
    from ddpm.training.samples import inference_pipeline
    from ddpm.unet import UNet

    config = parse_args(["--ddpm_inference_scheduler", name, "--ddpm_num_steps", "100",
                         "--ddpm_beta_schedule", "squaredcos_cap_v2"])
    noise = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    pipeline = inference_pipeline(config, UNet(**json.loads(Path(SMALL_UNET_CONFIG).read_text())), noise)
    reference = getattr(diffusers, theirs).from_config(
        diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2").config, **settings)
    assert type(pipeline.scheduler).__name__ == theirs
    pipeline.scheduler.set_timesteps(7)
    reference.set_timesteps(7)
    assert pipeline.scheduler.timesteps.tolist() == reference.timesteps.tolist()
