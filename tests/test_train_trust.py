"""Trust in the trainer's files (issue 13): no code runs from a checkpoint, a finished run stays finished, nothing
is deleted before it is checked, and every failure is one line that loses nothing already saved.

Most cases copy one finished tiny run (4 steps, checkpoints 2 and 4, EMA) and run ``python -m ddpm.train``'s
``main`` in this process through ``ddpm.cli.run``, exactly what its ``__main__`` does (no interpreter start-up per
case). The kills are in tests/test_crash_resume.py.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm.cli import run
from ddpm.train import main
from ddpm import UNet
from ddpm.training import TrainConfig, checkpoints, outputs, resume, rng, train
from ddpm.training import loop as loop_module
from ddpm.training.lock import LOCK_NAME, LockError, OutputLock
from ddpm.training.lr import get_scheduler
from helpers import TINY_UNET, write_training_files

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
EMA_WEIGHTS = "unet_ema/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    images, config = write_training_files(root, count=24, size=(20, 18), seed=0)
    return {"root": root, "images": images, "config": config}


def flags(files, output_dir, *extra):
    """The tiny run's flags: 24 images / batch 4 = 6 steps per epoch; 4 steps, checkpoints every 2, EMA."""
    base = ["--train_data_dir", files["images"], "--model_config_name_or_path", files["config"], "--resolution", 16,
            "--train_batch_size", 4, "--ddpm_num_steps", 50, "--ddpm_num_inference_steps", 2, "--eval_batch_size", 2,
            "--seed", 0, "--save_images_epochs", 100, "--save_model_epochs", 100, "--lr_warmup_steps", 2,
            "--lr_scheduler", "constant_with_warmup", "--use_ema", "--checkpointing_steps", 2,
            "--max_train_steps", 4, "--cache_dir", files["root"] / "hf-cache", "--output_dir", output_dir]
    return [str(a) for a in [*base, *extra]]


def tiny_config(files, output_dir, **overrides):
    return TrainConfig(**{**dict(train_data_dir=str(files["images"]), model_config_name_or_path=str(files["config"]),
                                 resolution=16, train_batch_size=4, ddpm_num_steps=50, ddpm_num_inference_steps=2,
                                 eval_batch_size=2, seed=0, output_dir=str(output_dir),
                                 cache_dir=str(files["root"] / "hf-cache")), **overrides})


def cli(argv, capsys):
    """``python -m ddpm.train argv`` in this process: (exit status, stdout, stderr)."""
    code = run(main, argv, prog="ddpm.train")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) >= 1 and lines[-1].startswith("ddpm.train: error: "), err
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


def snapshot(folder):
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    """A finished run (steps 1-4) and its snapshot; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code = run(main, flags(files, out), prog="ddpm.train")
    assert code == 0
    assert [p.name for _, p in checkpoints.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    return out


@pytest.fixture
def copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


class RunsACommand:
    """Unpickling this calls os.system: what a malicious file in a shared checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- 1. no code runs from a checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "unet/diffusion_pytorch_model.bin"])
def test_a_pickle_in_a_checkpoint_is_refused_and_never_runs(files, copy, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    (copy / "checkpoint-4" / name).write_bytes(pickle.dumps(RunsACommand(marker)))
    before = snapshot(copy)
    code, _, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest"], capsys)
    line = one_line_error(code, err, "checkpoint-4", name.split("/")[-1])
    assert "pickle" in line
    assert not marker.exists(), "the pickle's command ran"
    assert snapshot(copy) == before


def test_the_old_pickled_checkpoint_format_is_refused_saying_why(files, copy, tmp_path, capsys):
    """What accelerate's save_state wrote for earlier ddpm versions: COMPLETE, model.safetensors, optimizer.bin,
    custom_checkpoint_0.pkl, random_states_0.pkl."""
    marker = tmp_path / "pwned"
    old = copy / "checkpoint-6"
    old.mkdir()
    (old / "COMPLETE").write_text("ddpm training checkpoint of step 6, completely written\n")
    shutil.copy(copy / "checkpoint-4" / WEIGHTS, old / "model.safetensors")
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (old / name).write_bytes(pickle.dumps(RunsACommand(marker)))
    (old / "trainer_state.json").write_text(json.dumps({"global_step": 6, "epoch": 0, "seed": 0}))
    code, _, err = cli([*flags(files, copy, "--max_train_steps", 8), "--resume_from_checkpoint", "latest"], capsys)
    one_line_error(code, err, "checkpoint-6", "accelerate", "pickle")
    assert not marker.exists()


# ---- 2. a finished run stays finished -------------------------------------------------------------------------


def test_resuming_a_finished_run_is_a_no_op_and_leaves_every_byte(files, copy, capsys):
    before = snapshot(copy)
    for resume in ("latest", "checkpoint-4", str(copy / "checkpoint-4")):
        code, out, err = cli([*flags(files, copy), "--resume_from_checkpoint", resume], capsys)
        assert code == 0, err
        assert "already complete (4 of 4 steps)" in out
        assert snapshot(copy) == before, resume  # no extra step, no new log, no rewritten pipeline


def test_resuming_past_max_train_steps_trains_nothing(files, copy, capsys):
    before = snapshot(copy)
    code, out, err = cli([*flags(files, copy, "--max_train_steps", 2), "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err
    assert "nothing to train: checkpoint-4 is at step 4" in out
    assert snapshot(copy) == before


def test_a_run_stopped_after_its_last_checkpoint_saves_its_final_pipeline_on_resume(files, finished, copy, capsys):
    """A kill between the final checkpoint and the final pipeline: the old pipeline (here: the weights of step 2)
    is still there. The resume trains nothing and saves the final pipeline (and grid); once."""
    (copy / WEIGHTS).write_bytes((copy / "checkpoint-2" / EMA_WEIGHTS).read_bytes())
    (copy / "samples" / "epoch_0000.png").unlink()
    code, out, err = cli([*flags(files, copy), "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err
    assert "the run stopped before its final pipeline was saved: saving it now" in out
    assert (copy / WEIGHTS).read_bytes() == (finished / WEIGHTS).read_bytes()
    assert (copy / "samples" / "epoch_0000.png").is_file()
    assert load_file(copy / WEIGHTS).keys() == load_file(copy / "checkpoint-4" / EMA_WEIGHTS).keys()
    saved, ema = load_file(copy / WEIGHTS), load_file(copy / "checkpoint-4" / EMA_WEIGHTS)
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    before = snapshot(copy)
    code, out, _ = cli([*flags(files, copy), "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0 and "already complete" in out and snapshot(copy) == before


def test_resumes_at_an_epoch_boundary_continue_or_finish_exactly(files, tmp_path, capsys):
    """6 steps per epoch. A run of 6 steps ends on the epoch boundary; resumed with --max_train_steps 12 it gives
    bitwise the weights of a straight 12-step run. Resumed at its own end (the final pipeline lost), it saves
    that pipeline instead of printing "done" and saving nothing."""
    straight, half = tmp_path / "straight", tmp_path / "half"
    assert cli(flags(files, straight, "--max_train_steps", 12, "--checkpointing_steps", 6), capsys)[0] == 0
    assert cli(flags(files, half, "--max_train_steps", 6, "--checkpointing_steps", 6), capsys)[0] == 0
    for name in ("model_index.json", WEIGHTS):
        (half / name).unlink()  # as if killed after checkpoint-6, before the pipeline
    code, out, err = cli([*flags(files, half, "--max_train_steps", 6, "--checkpointing_steps", 6),
                          "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0 and "saving it now" in out, err
    assert load_file(half / WEIGHTS).keys() == load_file(half / "checkpoint-6" / EMA_WEIGHTS).keys()
    code, out, err = cli([*flags(files, half, "--max_train_steps", 12, "--checkpointing_steps", 6),
                          "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err
    assert f"resumed from {half / 'checkpoint-6'} at step 6 (epoch 1, skipping 0 batches" in out
    for name in (WEIGHTS, EMA_WEIGHTS, checkpoints.OPTIMIZER_NAME):
        a, b = load_file(straight / "checkpoint-12" / name), load_file(half / "checkpoint-12" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ---- 4. nothing is deleted before everything is checked -------------------------------------------------------


@pytest.mark.parametrize("bad, words", [
    (["--train_data_dir", "no/such/folder"], ["no/such/folder"]),
    (["--dataset_name", "someone/offline-dataset"], ["--train_data_dir"]),
    (["--logging_dir", "model_index.json"], ["model_index.json", "not a folder"]),
    (["--resolution", "15"], ["--resolution 15", "must be divisible by 2"]),
    (["--learning_rate", "inf"], ["--learning_rate"]),
])
def test_overwrite_output_dir_deletes_nothing_until_everything_is_checked(files, copy, capsys, bad, words):
    before = snapshot(copy)
    code, _, err = cli([*flags(files, copy), "--overwrite_output_dir", *bad], capsys)
    one_line_error(code, err, *words)
    assert snapshot(copy) == before


def test_overwrite_output_dir_deletes_the_earlier_run_once_checked(files, copy, capsys):
    (copy / "abandoned-checkpoint-9").mkdir()
    code, out, err = cli([*flags(files, copy, "--max_train_steps", 2), "--overwrite_output_dir"], capsys)
    assert code == 0, err
    assert "--overwrite_output_dir: deleted" in out
    assert sorted(p.name for p in copy.glob("*checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.parametrize("bad, words", [
    (["--learning_rate", "inf"], ["--learning_rate must be a finite number, got inf"]),
    (["--noise_offset", "nan"], ["--noise_offset must be a finite number, got nan"]),
    (["--logging_dir", "taken"], ["taken exists and is not a folder"]),  # TensorBoardTracker's error hid this
])
def test_bad_values_are_one_line_before_anything_is_created(files, tmp_path, capsys, bad, words):
    out = tmp_path / "fresh"
    if "taken" in bad:
        out.mkdir()
        (out / "taken").write_text("a file where the logs would go")
    before = snapshot(tmp_path)
    code, _, err = cli([*flags(files, out), *bad], capsys)
    one_line_error(code, err, *words)
    assert snapshot(tmp_path) == before and (out.exists() == ("taken" in bad))


# ---- 5. one run per output folder ---------------------------------------------------------------------------


def write_lock(folder, pid, host=None):
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "started": "earlier"}))


def test_a_second_run_in_the_same_folder_gets_one_line(files, copy, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(copy, holder.pid)
        before = snapshot(copy)
        code, _, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest"], capsys)
        one_line_error(code, err, "in use by another ddpm.train run", f"pid {holder.pid}")
        assert snapshot(copy) == before  # the holder's files (its lock included) untouched
    finally:
        holder.kill()
        holder.wait()
    write_lock(copy, 1, host="another-machine")
    code, _, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest"], capsys)
    one_line_error(code, err, "another-machine", f"delete {copy / LOCK_NAME}")


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(files, copy, capsys, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(copy, dead.pid)
    code, out, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err
    assert f"taking over {copy / LOCK_NAME} from process {dead.pid}" in caplog.text
    assert "resumed from" in out and not (copy / LOCK_NAME).exists()  # released at the end


def test_the_lock_refuses_a_live_holder_and_releases_only_its_own(tmp_path):
    with OutputLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        try:
            write_lock(tmp_path, holder.pid)  # someone else's now
            with pytest.raises(LockError, match=f"pid {holder.pid}"):
                OutputLock(tmp_path).acquire()
            lock.release()
            assert (tmp_path / LOCK_NAME).is_file()  # not ours any more: left alone
        finally:
            holder.kill()
            holder.wait()


# ---- 6. tracebacks become one line ---------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(files, copy, capsys, monkeypatch):
    real = checkpoints._write_bytes

    def disk_full(path, data):
        if path.name == checkpoints.OPTIMIZER_NAME and ".tmp-checkpoint-6" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoints, "_write_bytes", disk_full)
    code, _, err = cli([*flags(files, copy, "--max_train_steps", 8), "--resume_from_checkpoint", "latest"], capsys)
    one_line_error(code, err, "could not write checkpoint-6", "No space left on device", "earlier checkpoints are kept")
    assert [p.name for _, p in checkpoints.complete_checkpoints(copy)] == ["checkpoint-2", "checkpoint-4"]
    assert not list(copy.glob(".tmp-*")) and not (copy / LOCK_NAME).exists()
    monkeypatch.undo()
    code, out, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0 and "resumed from" in out and "at step 4" in out, err  # checkpoint-4 still loads


def test_a_read_only_output_folder_on_resume_is_one_line(files, copy, capsys, monkeypatch):
    before = snapshot(copy)
    os.chmod(copy, 0o555)
    try:
        if os.access(copy, os.W_OK):  # root writes anywhere: make the check see what a user would
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == copy else real(p, mode, **kw))
        code, _, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest"],
                           capsys)
    finally:
        os.chmod(copy, 0o755)
    one_line_error(code, err, str(copy), "not writable")
    assert snapshot(copy) == before


def test_a_tracker_that_fails_to_start_shows_its_own_error(files, tmp_path, monkeypatch):
    """accelerate's end_training() used to raise "TensorBoardTracker has no attribute 'writer'" over the real
    error of a tracker that never started."""
    from accelerate.tracking import TensorBoardTracker

    def broken_start(self):
        raise OSError(errno.EIO, "Input/output error", "logs")

    monkeypatch.setattr(TensorBoardTracker, "start", broken_start)
    with pytest.raises(OSError, match="Input/output error"):
        train(tiny_config(files, tmp_path / "out", max_train_steps=1))


def test_resuming_with_another_model_config_is_one_line(files, copy, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_UNET, "block_out_channels": [8, 24]}))
    before = snapshot(copy)
    code, _, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest",
                        "--model_config_name_or_path", str(other)], capsys)
    one_line_error(code, err, "checkpoint-4", "different model config", "block_out_channels")
    code, _, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest",
                        "--ddpm_beta_schedule", "squaredcos_cap_v2"], capsys)
    one_line_error(code, err, "checkpoint-4", "different noise schedule", "beta_schedule")
    assert snapshot(copy) == before


@pytest.mark.parametrize("damage", ["truncated weights", "flipped optimizer byte", "missing RNG state"])
def test_a_damaged_checkpoint_makes_latest_fall_back_to_the_newest_that_loads(files, copy, capsys, caplog, damage):
    ckpt = copy / "checkpoint-4"
    if damage == "truncated weights":
        broken = ckpt / WEIGHTS
        broken.write_bytes(broken.read_bytes()[:1000])
    elif damage == "flipped optimizer byte":
        broken = ckpt / checkpoints.OPTIMIZER_NAME
        data = bytearray(broken.read_bytes())
        data[-10] ^= 0xFF  # same size, other contents: only the hash sees it
        broken.write_bytes(bytes(data))
    else:
        broken = ckpt / "rng_state_0.safetensors"
        broken.unlink()  # a resume without it would silently not be bit-exact
    code, _, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "checkpoint-4"],
                       capsys)
    one_line_error(code, err, str(broken))
    code, out, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err
    assert str(broken) in caplog.text and "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    assert f"resumed from {copy / 'checkpoint-2'} at step 2" in out
    assert (copy / "abandoned-checkpoint-4").is_dir()  # the damaged one is kept, set aside


@pytest.mark.parametrize("step", [-3, 0, 100000, "4"])
def test_a_hand_edited_step_is_one_line_and_changes_nothing(files, copy, capsys, step):
    path = copy / "checkpoint-4" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "global_step": step}))
    before = snapshot(copy)
    code, _, err = cli([*flags(files, copy, "--max_train_steps", 6), "--resume_from_checkpoint", "latest"], capsys)
    one_line_error(code, err, "trainer_state.json", "global_step")
    assert snapshot(copy) == before  # before: a negative step renamed every checkpoint to abandoned-*


# ---- 7. random states ---------------------------------------------------------------------------------------


def test_rng_states_round_trip_through_safetensors(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # a cached gaussian in numpy's state
    (tmp_path / "rng_state_0.safetensors").write_bytes(rng.state_bytes())
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng.restore(tmp_path / "rng_state_0.safetensors")
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


def test_a_process_without_its_rng_state_is_warned_about_by_name(files, finished, caplog):
    """A resume with more processes than the run that wrote the checkpoint: process 1 has no RNG state."""
    path = finished / "checkpoint-4"
    state = resume.read_state(path)
    config = tiny_config(files, finished)
    model = UNet.from_config(outputs.model_config(config))
    optimizer = torch.optim.AdamW(model.parameters())
    objects = checkpoints.TrainingObjects(model, optimizer, get_scheduler("constant", optimizer), None, None, None)
    resume.load_checkpoint(path, state, objects, process_index=1)
    assert str(path / "rng_state_1.safetensors") in caplog.text and "NOT bit-exact" in caplog.text


def test_non_finite_settings_are_refused_by_the_python_api_too():
    for field in ("learning_rate", "noise_offset", "adam_epsilon", "ema_power", "snr_gamma"):
        for value in (float("inf"), float("nan")):
            with pytest.raises(ValueError, match=f"--{field} must be a finite number"):
                TrainConfig(**{field: value})


def test_the_loop_refuses_non_finite_weights_before_saving_them(files, tmp_path, monkeypatch):
    """The last line of defence: whatever made the weights NaN, no checkpoint is written with them."""
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] >= 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    config = tiny_config(files, tmp_path / "out", max_train_steps=3, checkpointing_steps=1)
    with pytest.raises(loop_module.NonFiniteError, match=r"weights hold NaN or infinity at step 2.*checkpoint-1, is kept"):
        train(config)
    assert [p.name for _, p in checkpoints.complete_checkpoints(tmp_path / "out")] == ["checkpoint-1"]
