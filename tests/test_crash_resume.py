"""Crash safety (issues 7 and 13): SIGKILL at a random moment, during a checkpoint save, after the last step and
during the final pipeline save, then resume from "latest" each time: the final weights are bitwise those of an
uninterrupted run, and resuming the finished run changes no byte. SIGTERM and Ctrl-C checkpoint and stop cleanly.
Checkpoint folders are complete or ignored, and pruning keeps the newest complete one.

The kills at exact moments come from a driver that runs ``python -m ddpm.train``'s ``main`` with one function
wrapped to SIGKILL its own process there: no test hook in the library, and no race with a polling loop.
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from ddpm.training import checkpoints, resume
from ddpm.training.signals import StopRequest
from helpers import write_training_files

STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    images, _ = write_training_files(root, count=16, size=(12, 10), seed=1)
    flags = ["--train_data_dir", images, "--model_config_name_or_path", root / "tiny.json", "--resolution", 8,
             "--train_batch_size", 4, "--max_train_steps", STEPS, "--use_ema", "--random_flip", "--seed", 7,
             "--ddpm_num_steps", 50, "--ddpm_num_inference_steps", 2, "--eval_batch_size", 1,
             "--save_images_epochs", 100, "--save_model_epochs", 100, "--lr_warmup_steps", 3,
             "--learning_rate", 1e-3, "--cache_dir", root / "cache"]
    env = {**os.environ, "HF_HOME": str(root / "hf-home"), "OMP_NUM_THREADS": "1"}  # 1 thread: no oversubscription
    command = [sys.executable, "-m", "ddpm.train", *map(str, flags)]
    straight = root / "straight"
    r = subprocess.run([*command, "--output_dir", str(straight), "--checkpointing_steps", "2"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return {"command": command, "env": env, "straight": straight, "root": root}


# Runs ddpm.train with a SIGKILL at the moment named by DDPM_TEST_KILL_AT (see the test's docstring).
DRIVER = """
import os, signal, sys
from ddpm.cli import run
from ddpm.train import main
from ddpm.training import checkpoints, outputs

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

moment = os.environ["DDPM_TEST_KILL_AT"]
if moment == "mid_checkpoint":  # the first checkpoint save: its files written, no COMPLETE manifest yet
    checkpoints._write_shared_files = lambda *a, real=checkpoints._write_shared_files: (real(*a), die())
elif moment == "after_last_checkpoint":  # the final checkpoint is complete; the pipeline not yet saved
    def save(accelerator, output_dir, step, state, objects, real=checkpoints.save_checkpoint):
        path = real(accelerator, output_dir, step, state, objects)
        if step == int(os.environ["DDPM_TEST_LAST_STEP"]):
            die()
        return path
    checkpoints.save_checkpoint = save
elif moment == "pipeline_staged":  # the final pipeline written to .tmp-pipeline/, not swapped in yet
    def commit(self, real=outputs.StagedPipeline.commit):
        if (self.out / ("checkpoint-" + os.environ["DDPM_TEST_LAST_STEP"])).is_dir():
            die()
        real(self)  # an epoch's pipeline before the end
    outputs.StagedPipeline.commit = commit
sys.exit(run(main, sys.argv[1:], prog="ddpm.train"))
"""


def kill_at(moment, command, env):
    """Run ``command`` (python -m ddpm.train ...) through DRIVER, dying at ``moment``; return its exit status."""
    driver = [sys.executable, "-c", DRIVER, *command[3:]]
    r = subprocess.run(driver, env={**env, "DDPM_TEST_KILL_AT": moment, "DDPM_TEST_LAST_STEP": str(STEPS)},
                       capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def final_weights(output_dir):
    """The saved pipeline's UNet (EMA weights) and the step-12 checkpoint's raw model, EMA and optimiser."""
    out = {"pipeline": load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")}
    checkpoint = output_dir / f"checkpoint-{STEPS}"
    for name, path in [("model", "unet/diffusion_pytorch_model.safetensors"),
                       ("ema", "unet_ema/diffusion_pytorch_model.safetensors"), ("optimizer", "optimizer.safetensors")]:
        out[name] = load_file(checkpoint / path)
    return out


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def wait_until(condition, process, timeout=240.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the training process")


def test_sigkill_at_every_kind_of_moment_then_resume_latest_is_bitwise_equal(setup, tmp_path):
    """A random moment (from outside), then inside a checkpoint save, during the final pipeline save at the end
    of training, and again during the final pipeline save of the resume that finishes it; each run resumes
    from "latest". The result is bitwise the uninterrupted run's, and one more resume changes no byte."""
    out = tmp_path / "crashy"
    command = [*setup["command"], "--output_dir", str(out), "--checkpointing_steps", "2",
               "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest"]
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    for attempt in range(3):  # the random kill must land before the run ends; a fast machine may finish first
        shutil.rmtree(out, ignore_errors=True)
        process = subprocess.Popen([*command, "--debug"], env=setup["env"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
        reader.start()
        wait_until(lambda: any("first batch" in line for line in lines), process)  # training has started
        time.sleep(rng.uniform(0.0, 0.3))
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait(timeout=60)
        reader.join(timeout=10)
        assert "Traceback" not in "".join(lines)
        if process.returncode == -signal.SIGKILL and not (out / f"checkpoint-{STEPS}").exists():
            break
    else:
        pytest.fail(f"the run always finished before the random kill (seed {seed})")

    assert kill_at("mid_checkpoint", command, setup["env"]) == -signal.SIGKILL
    assert list(out.glob(".tmp-checkpoint-*")), "killed inside a checkpoint save"
    assert kill_at("pipeline_staged", command, setup["env"]) == -signal.SIGKILL  # trains to the end
    assert (out / f"checkpoint-{STEPS}" / checkpoints.MARKER).is_file() and (out / ".tmp-pipeline").is_dir()
    assert kill_at("pipeline_staged", command, setup["env"]) == -signal.SIGKILL  # the resume that finishes it

    r = subprocess.run(command, env=setup["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "saving it now" in r.stdout
    assert not list(out.glob(".tmp-*"))
    assert len(checkpoints.complete_checkpoints(out)) <= 2
    assert_bitwise_equal(final_weights(setup["straight"]), final_weights(out))

    before = snapshot(out)
    r = subprocess.run(command, env=setup["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
    assert snapshot(out) == before


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes_exactly(setup, tmp_path):
    out = tmp_path / "term"
    command = [*setup["command"], "--output_dir", str(out), "--checkpointing_steps", "1000"]
    process = subprocess.Popen([*command, "--debug"], env=setup["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    wait_until(lambda: any("first batch" in line for line in lines), process)  # training has started
    process.send_signal(signal.SIGTERM)
    stdout = process.stdout.read()
    process.wait(timeout=120)
    reader.join(timeout=10)
    stderr = "".join(lines)
    if process.returncode == 0:
        pytest.fail(f"training finished before SIGTERM arrived; stderr: {stderr[-2000:]}")
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    saved = checkpoints.complete_checkpoints(out)
    assert len(saved) == 1
    step = saved[0][0]
    assert 0 < step < STEPS
    assert f"stopped by SIGTERM at step {step}" in stdout and "--resume_from_checkpoint latest" in stdout

    # Resumed, and killed again right after the final checkpoint (after the last step, before the pipeline)
    assert kill_at("after_last_checkpoint", [*command, "--resume_from_checkpoint", "latest"], setup["env"]) == \
        -signal.SIGKILL
    assert (out / f"checkpoint-{STEPS}" / checkpoints.MARKER).is_file()
    r = subprocess.run([*command, "--resume_from_checkpoint", "latest"], env=setup["env"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "saving it now" in r.stdout and "***** training *****" not in r.stdout  # the pipeline, no training
    assert_bitwise_equal(final_weights(setup["straight"]), final_weights(out))


def test_ctrl_c_and_sigterm_only_set_the_stop_flag():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher's follow-up SIGTERM is ignored while stopping
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back


def make_checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        (path / checkpoints.MARKER).write_text("")
    return path


def test_latest_skips_incomplete_checkpoints_with_a_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-x").mkdir()  # not a step number: ignored
    with caplog.at_level(logging.WARNING, logger="ddpm.training.checkpoints"):
        assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert "checkpoint-12" in caplog.text and "incomplete" in caplog.text
    assert resume.resolve_resume(str(tmp_path), "checkpoint-2") == tmp_path / "checkpoint-2"
    with pytest.raises(resume.CheckpointError, match="checkpoint-12 is incomplete"):
        resume.resolve_resume(str(tmp_path), "checkpoint-12")
    with pytest.raises(resume.CheckpointError, match="no such checkpoint.*checkpoint-2, checkpoint-10"):
        resume.resolve_resume(str(tmp_path), "checkpoint-7")
    assert resume.resolve_resume(str(tmp_path / "empty"), "latest") is None


def test_pruning_never_deletes_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 8, complete=False)
    removed = checkpoints.prune_checkpoints(str(tmp_path), 1)
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for _, p in checkpoints.checkpoint_folders(tmp_path)] == ["checkpoint-6", "checkpoint-8"]
    assert checkpoints.prune_checkpoints(str(tmp_path), 1) == []
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"


def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / checkpoints.MARKER).write_text("done")
    (tmp_path / "abandoned-checkpoint-6").mkdir()  # from an earlier abandoned run: not overwritten
    moved = checkpoints.set_aside_newer(str(tmp_path), 2)
    assert [(old.name, new.name) for old, new in moved] == [
        ("checkpoint-4", "abandoned-checkpoint-4"), ("checkpoint-6", "abandoned-2-checkpoint-6")]
    assert [p.name for _, p in checkpoints.complete_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "abandoned-2-checkpoint-6" / checkpoints.MARKER).is_file()  # renamed, not deleted
    # the new run's checkpoints are then the newest: pruning and 'latest' act on them, not on the abandoned ones
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / checkpoints.MARKER).write_text("done")
    assert checkpoints.prune_checkpoints(str(tmp_path), 1) == [tmp_path / "checkpoint-2"]
    assert resume.resolve_resume(str(tmp_path), "latest") == tmp_path / "checkpoint-3"
