"""Bad flags, paths and files given to ``python -m ddpm.sample`` and ``python -m ddpm.evaluate``.

Every case must exit with status 2 and no traceback. Errors that ddpm raises itself are exactly one line,
``ddpm.<cli>: error: <message>``. argparse's own errors (an unknown choice, a non-integer, an unknown flag) follow
argparse's convention: the usage block, then one ``python -m ddpm.<cli>: error: <message>`` line; we accept that,
since the error itself is still one line and the usage is what the user needs next. ``--debug`` shows the traceback.

The matrix runs the CLIs' ``main`` in this process through ``ddpm.cli.run``, exactly what their ``__main__`` does
(a subprocess per case would cost seconds of interpreter start-up each); two subprocess runs check the real entry.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ddpm import DDPMScheduler, Pipeline, UNet
from ddpm.cli import run

PROGS = {"sample": "ddpm.sample", "evaluate": "ddpm.evaluate"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny valid pipeline (1 channel, 8x8, 10 timesteps) and broken copies of it."""
    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    unet = UNet(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                norm_num_groups=4, attention_head_dim=None, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"))
    good = root / "good"
    Pipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(good)
    out = {"good": good, "missing": root / "no_such_model", "file": root / "a_file.txt", "empty": root / "empty",
           "out": root / "out"}
    out["file"].write_text("not a model")
    out["empty"].mkdir()

    def edit_json(path: Path, **changes: Any) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:100])

    edits = {
        "corrupt_index": lambda d: (d / "model_index.json").write_text('{"_class_name": "DDPMPipeline", '),
        "index_is_a_list": lambda d: (d / "model_index.json").write_text("[1, 2]"),
        "index_scheduler_not_a_pair": lambda d: edit_json(d / "model_index.json", scheduler=["diffusers"]),
        "truncated_weights": lambda d: truncate(d / "unet" / "diffusion_pytorch_model.safetensors"),
        "no_weights": lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
        "bad_unet_config": lambda d: edit_json(d / "unet" / "config.json", block_out_channels=[4, 6]),
        "empty_unet_config": lambda d: (d / "unet" / "config.json").write_text(""),
        "bad_scheduler_config": lambda d: edit_json(d / "scheduler" / "scheduler_config.json", beta_start="0.1"),
        "unet_config_wrong_type": lambda d: edit_json(d / "unet" / "config.json", layers_per_block="2"),
        "scheduler_config_wrong_type": lambda d: edit_json(d / "scheduler" / "scheduler_config.json",
                                                           clip_sample="yes"),
    }
    for name, edit in edits.items():
        shutil.copytree(good, root / name)
        edit(root / name)
        out[name] = root / name
    # A training checkpoint (contract 1) whose EMA weights are truncated, and a run folder with only checkpoints.
    checkpoint = root / "run" / "checkpoint-4"
    shutil.copytree(good / "unet", checkpoint / "unet")
    shutil.copytree(good / "unet", checkpoint / "unet_ema")
    truncate(checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors")
    out["bad_ema_checkpoint"], out["run_without_pipeline"] = checkpoint, root / "run"
    out["old_samples"] = root / "old_samples"
    out["old_samples"].mkdir()
    (out["old_samples"] / "00000.png").write_bytes(b"")  # only its name matters
    return out


def invoke(cli: str, argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``python -m ddpm.<cli> argv`` in this process: (exit status, stderr)."""
    module = importlib.import_module(f"ddpm.{cli}")
    try:
        code = run(module.main, [str(a) for a in argv], prog=PROGS[cli])
    except SystemExit as e:  # argparse exits by itself
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


# (name, which CLIs, argv with {path} placeholders, raised by argparse?, words the error line must hold)
CASES: list[tuple[str, tuple[str, ...], list[str], bool, list[str]]] = [
    ("unknown_scheduler", ("sample", "evaluate"), ["--scheduler", "pndm"], True, ["--scheduler", "pndm"]),
    ("negative_num_images", ("sample", "evaluate"), ["--num_images", "-1"], False, ["--num_images"]),
    ("zero_batch_size", ("sample", "evaluate"), ["--batch_size", "0"], False, ["--batch_size"]),
    ("non_integer_batch_size", ("sample", "evaluate"), ["--batch_size", "abc"], True, ["--batch_size", "abc"]),
    ("zero_steps", ("sample", "evaluate"), ["--num_inference_steps", "0"], False, ["--num_inference_steps"]),
    ("too_many_steps", ("sample", "evaluate"), ["--num_inference_steps", "11"], False,
     ["--num_inference_steps", "10"]),
    ("fractional_steps", ("sample", "evaluate"), ["--num_inference_steps", "2.5"], True, ["--num_inference_steps"]),
    ("non_numeric_eta", ("sample", "evaluate"), ["--eta", "much"], True, ["--eta"]),
    ("non_integer_seed", ("sample", "evaluate"), ["--seed", "1e3"], True, ["--seed"]),
    ("unknown_flag", ("sample", "evaluate"), ["--guidance_scale", "7"], True, ["--guidance_scale"]),
    ("no_model_flag", ("sample", "evaluate"), ["--model"], True, ["--model"]),
    ("missing_model_dir", ("sample", "evaluate"), ["--model", "{missing}"], False, ["no_such_model"]),
    ("file_instead_of_dir", ("sample", "evaluate"), ["--model", "{file}"], False, ["a_file.txt"]),
    ("folder_without_model", ("sample", "evaluate"), ["--model", "{empty}"], False, ["not a pipeline folder"]),
    ("corrupt_model_index", ("sample", "evaluate"), ["--model", "{corrupt_index}"], False,
     ["model_index.json", "not valid JSON"]),
    ("model_index_not_an_object", ("sample", "evaluate"), ["--model", "{index_is_a_list}"], False,
     ["model_index.json"]),
    ("model_index_scheduler_not_a_pair", ("sample", "evaluate"), ["--model", "{index_scheduler_not_a_pair}"], False,
     ["model_index.json", "scheduler"]),
    ("truncated_weights", ("sample", "evaluate"), ["--model", "{truncated_weights}"], False,
     ["diffusion_pytorch_model.safetensors", "truncated"]),
    ("missing_weights", ("sample", "evaluate"), ["--model", "{no_weights}"], False, ["diffusion_pytorch_model"]),
    ("invalid_unet_config", ("sample", "evaluate"), ["--model", "{bad_unet_config}"], False,
     ["config.json", "block_out_channels"]),
    ("empty_unet_config", ("sample", "evaluate"), ["--model", "{empty_unet_config}"], False,
     ["config.json", "not valid JSON"]),
    ("invalid_scheduler_config", ("sample", "evaluate"), ["--model", "{bad_scheduler_config}"], False,
     ["beta_start"]),
    ("unknown_device", ("sample", "evaluate"), ["--device", "nonsense"], False, ["--device", "nonsense"]),
    ("absent_device", ("sample", "evaluate"), ["--device", "cuda:99"], False, ["--device", "cuda:99"]),
    ("negative_eta", ("sample", "evaluate"), ["--scheduler", "ddim", "--eta", "-1"], False, ["--eta"]),
    ("nan_eta", ("sample", "evaluate"), ["--scheduler", "ddim", "--eta", "nan"], False, ["--eta"]),
    ("solver_order_on_ddim", ("sample", "evaluate"), ["--scheduler", "ddim", "--solver_order", "2"], False,
     ["--solver_order", "ddim"]),
    ("solver_order_4", ("sample", "evaluate"), ["--scheduler", "dpm", "--solver_order", "4"], True, ["--solver_order"]),
    ("karras_on_ddpm", ("sample", "evaluate"), ["--scheduler", "ddpm", "--karras_sigmas"], False,
     ["--karras_sigmas", "ddpm"]),
    ("seed_out_of_range", ("sample", "evaluate"), ["--seed", str(2**70)], False, ["--seed"]),
    ("output_is_a_file", ("sample",), ["--output", "{file}"], False, ["a_file.txt"]),
    ("output_dir_is_a_file", ("evaluate",), ["--output_dir", "{file}"], False, ["a_file.txt"]),
    ("too_few_images_to_score", ("evaluate",), ["--num_images", "3"], False, ["--num_images"]),
    ("resolution_mismatch", ("evaluate",), ["--resolution", "16"], False, ["--resolution", "16"]),
    ("missing_feature_extractor", ("evaluate",), ["--feature_extractor", "{missing}"], False, ["no_such_model"]),
    ("feature_extractor_not_a_model", ("evaluate",), ["--feature_extractor", "{file}"], False,
     ["a_file.txt", "TorchScript"]),
    ("missing_train_data_dir", ("evaluate",), ["--train_data_dir", "{missing}"], False, ["--train_data_dir"]),
    ("train_data_dir_is_a_file", ("evaluate",), ["--train_data_dir", "{file}"], False, ["--train_data_dir"]),
    ("train_data_dir_without_images", ("evaluate",), ["--train_data_dir", "{empty}"], False, ["--train_data_dir"]),
    ("unreachable_dataset", ("evaluate",), ["--dataset_name", "no-such-user/no-such-dataset"], False,
     ["--dataset_name"]),
    ("zero_extractor_steps", ("evaluate",), ["--extractor_steps", "0"], False, ["--extractor_steps"]),
    # Wrongly typed config values were TypeErrors, shown as one line only because USER_ERRORS caught every
    # TypeError (and so hid real bugs); they are ValueErrors naming the file and key now.
    ("unet_config_wrong_type", ("sample", "evaluate"), ["--model", "{unet_config_wrong_type}"], False,
     ["config.json", "layers_per_block"]),
    ("scheduler_config_wrong_type", ("sample", "evaluate"), ["--model", "{scheduler_config_wrong_type}"], False,
     ["clip_sample"]),
    ("no_ema_on_a_pipeline", ("sample", "evaluate"), ["--no_ema"], False, ["--no_ema", "checkpoint"]),
    ("truncated_ema_weights_in_checkpoint", ("sample", "evaluate"), ["--model", "{bad_ema_checkpoint}"], False,
     ["unet_ema", "truncated"]),
    ("run_folder_without_pipeline", ("sample", "evaluate"), ["--model", "{run_without_pipeline}"], False,
     ["checkpoint-4"]),
    ("output_holds_old_samples", ("sample",), ["--output", "{old_samples}"], False,
     ["old_samples", "--overwrite"]),
]

def _params() -> list[Any]:
    params = []
    for name, clis, argv, by_argparse, words in CASES:
        for cli in clis:
            params.append(pytest.param(cli, argv, by_argparse, words, id=f"{cli}-{name}"))
    return params


@pytest.mark.parametrize("cli, argv, by_argparse, words", _params())
def test_bad_input_is_a_one_line_error(cli: str, argv: list[str], by_argparse: bool, words: list[str],
                                       paths: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    if "--model" not in args:
        args = ["--model", str(paths["good"]), *args]
    # Small enough that a case wrongly accepted finishes in seconds instead of sampling 1000 images.
    cheap = {"--num_images": "4", "--num_inference_steps": "1", "--batch_size": "4", "--extractor_steps": "1",
             "--output": str(paths["out"]), "--output_dir": str(paths["out"])}
    for flag, value in cheap.items():
        if flag not in args and (flag, cli) not in {("--output", "evaluate"), ("--output_dir", "sample"),
                                                    ("--extractor_steps", "sample")}:
            args += [flag, value]
    code, err = invoke(cli, args, capsys)
    assert code == 2, f"exit status {code}; stderr: {err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    prefix = f"python -m {PROGS[cli]}: error: " if by_argparse else f"{PROGS[cli]}: error: "
    assert lines and lines[-1].startswith(prefix), err
    if by_argparse:  # argparse's usage block, then its one error line
        assert lines[0].startswith("usage: ") and all(line.startswith(" ") for line in lines[1:-1]), err
    else:
        assert len(lines) == 1, err
    for word in words:
        assert word in lines[-1], f"{word!r} not in {lines[-1]!r}"


@pytest.mark.parametrize("cli", ["sample", "evaluate"])
def test_debug_raises_with_the_traceback(cli: str, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        invoke(cli, ["--model", paths["missing"], "--debug"], capsys)
    with pytest.raises(ValueError, match="truncated"):
        invoke(cli, ["--model", paths["truncated_weights"], "--debug"], capsys)


def _python_m(module: str, *args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_real_entry_point_one_line_error_and_debug(paths: dict[str, Path]) -> None:
    # ddpm.sample's entry point is run by test_sample_cli.py; this is ddpm.evaluate's.
    r = _python_m("ddpm.evaluate", "--model", paths["corrupt_index"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.fullmatch(r"ddpm\.evaluate: error: .*model_index\.json is not valid JSON.*", r.stderr.strip()), r.stderr
    r = _python_m("ddpm.evaluate", "--model", paths["corrupt_index"], "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "model_index.json" in r.stderr
