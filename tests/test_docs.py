"""Every command in README.md and docs/ runs as written (issue 14), with tiny sizes.

Each ```bash and ```python block of README.md and docs/**/*.md is one test, run in a fresh folder of its own that
holds what the docs assume: ``ddpm-fashion-mnist-32/`` (what ``python -m ddpm.train`` writes, trained once with
tiny sizes and shared), ``my_images/`` (a few images) and ``tiny-unet.json`` (a tiny UNet config).

A shell command is looked up in COMMANDS, top to bottom, first match wins; its action says what the test does:

- RUN    run it as written, with SHRINK[program] appended: argparse keeps the last value of a repeated flag, so
         these replace the documented sizes (steps, images, model) and nothing else; SUBSTITUTE first renames
         what the tiny run names differently (its checkpoint steps);
- PARSE  it needs a GPU, several processes or the network: accelerate's and ddpm's own parsers check every flag
         and value instead, and `--multi_gpu` must come with `--num_processes` (without it accelerate fails on a
         machine with no GPU);
- HELP   it writes outside its folder (e.g. into docs/): run it with --help, which imports it and builds its parser;
- EXTRA  `pip install -e ".[name]"`: the extra exists in pyproject.toml;
- SKIP   with the reason (installing, or running this very test suite).

A command that no pattern matches fails, naming this table: add a row. Identical training commands run once.
A python block runs in a subprocess after the PRELUDES whose pattern it matches: each shrinks a size the same way
(TrainConfig) or defines the names an excerpt assumes. Extend the two tables, not the test code.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}

RUN, PARSE, HELP, EXTRA, SKIP = "run", "parse", "help", "extra", "skip"

# (regular expression searched in the command, action, why). First match wins.
COMMANDS: list[tuple[str, str, str]] = [
    (r"^pip install -e \.$", SKIP, "installs this package: the tests run in it"),
    (r"^pip install -e \"?\.\[[\w,]+\]\"?$", EXTRA, "installs extras: each must exist in pyproject.toml"),
    (r"^pip install( \S+)* --index-url ", SKIP, "downloads torch from another index"),
    (r"^python -m pytest\b", SKIP, "runs this test suite"),
    (r"^accelerate launch\b", PARSE, "launches processes on GPUs"),
    (r"--dataset_name|--push_to_hub", PARSE, "downloads a hub dataset or uploads to the hub"),
    (r"--feature_extractor inception", PARSE, "needs the inception extra and the Inception weights (a download)"),
    (r"^python -m ddpm\.(train|sample|evaluate)\b", RUN, ""),
    (r"^python docs/real-run/make_figures\.py\b", HELP, "writes its figures into docs/real-run/"),
    (r"^python docs/samplers/make_table\.py\b", HELP, "writes its table into docs/samplers/ (and takes about 25 minutes)"),
    (r"^tensorboard\b", HELP, "starts a server"),
]

# Flags appended to a RUN of each program: tiny sizes, the same meaning.
SHRINK: dict[str, list[str]] = {
    "ddpm.train": ["--max_train_steps", "2", "--model_config_name_or_path", "tiny-unet.json", "--resolution", "8",
                   "--checkpointing_steps", "1", "--train_batch_size", "4", "--eval_batch_size", "2", "--ddpm_num_inference_steps", "2",
                   "--eval_num_images", "8", "--eval_extractor_steps", "2"],
    "ddpm.sample": ["--num_images", "2", "--num_inference_steps", "2"],
    "ddpm.evaluate": ["--num_images", "8", "--num_inference_steps", "2", "--extractor_steps", "2"],
}

# (regular expression, replacement, why): applied to a RUN command before SHRINK.
SUBSTITUTE: list[tuple[str, str, str]] = [
    (r"/checkpoint-\d+\b", "/checkpoint-2", "the tiny runs checkpoint at steps 1 and 2"),
]

# Each program's own parser, for PARSE: "module:function" taking argv.
PARSERS = {"ddpm.train": "ddpm.training:parse_args", "ddpm.sample": "ddpm.sample:parse_args",
           "ddpm.evaluate": "ddpm.evaluate:parse_args"}

TINY_UNET = ('{"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1, '
             '"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, '
             '"down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}')

# (regular expression searched in a python block, code run before it, why)
PRELUDES: list[tuple[str, str, str]] = [
    (r"TrainConfig\(", """
import ddpm.training as _training
_TrainConfig = _training.TrainConfig
def _tiny_train_config(*args, **kwargs):  # the documented call, with tiny sizes
    return _TrainConfig(*args, **{**kwargs, "max_train_steps": 2, "model_config_name_or_path": "tiny-unet.json",
                                  "resolution": 8, "train_batch_size": 4, "eval_batch_size": 2,
                                  "ddpm_num_inference_steps": 2})
_training.TrainConfig = _tiny_train_config
""", "the documented TrainConfig, with tiny sizes"),
    (r"^with torch\.no_grad\(\), unet\.frozen_weights\(\):", """
import torch
from ddpm import Pipeline
_pipe = Pipeline.from_pretrained("ddpm-fashion-mnist-32")
unet, scheduler = _pipe.unet, _pipe.scheduler
scheduler.set_timesteps(2)
sample = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
""", "an excerpt of a sampling loop: the names it assumes"),
]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def find_blocks() -> list[Block]:
    blocks = []
    fence = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in fence.finditer(text):
            language = LANGUAGES.get(m.group(1).lower())
            if language is not None:
                blocks.append(Block(path, text[:m.start()].count("\n") + 1, language, m.group(2)))
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``a && b`` split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            commands.append(shlex.join(words[:end]).replace("'", '"'))
            words = words[end + 1:]
    return commands


def classify(command: str) -> tuple[str, str]:
    for pattern, action, why in COMMANDS:
        if re.search(pattern, command):
            return action, why
    pytest.fail(f"no rule for the documented command {command!r}: add a row to COMMANDS in {__file__}")


def environment() -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": path,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def execute(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)


def program_and_args(words: list[str]) -> tuple[str, list[str]]:
    """("ddpm.train", flags) for ``python -m ddpm.train flags``; (script path, args) for ``python script args``."""
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


def run_command(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    for pattern, replacement, _ in SUBSTITUTE:
        command = re.sub(pattern, replacement, command)
    words = shlex.split(command)
    program, args = program_and_args(words)
    return execute([sys.executable, "-m", program, *args, *SHRINK.get(program, [])], cwd)


def parse_command(command: str) -> None:
    """Check a command's flags with the parsers that would read them, without running it."""
    words = shlex.split(command)
    if words[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        try:
            launch = launch_command_parser().parse_args(words[2:])
        except SystemExit:
            pytest.fail(f"accelerate rejects the flags of {command!r}")
        if launch.multi_gpu and launch.num_processes is None:
            pytest.fail(f"{command!r}: accelerate launch --multi_gpu without --num_processes fails on a machine "
                        f"without GPUs; write the process count, e.g. --num_processes 2")
        assert launch.module, f"{command!r}: expected accelerate launch -m <module>"
        program, args = launch.training_script, launch.training_script_args
    else:
        program, args = program_and_args(words)
    module, function = PARSERS[program].split(":")
    try:
        getattr(importlib.import_module(module), function)(args)
    except SystemExit:
        pytest.fail(f"{program} rejects the flags of {command!r}")


def check_extras(command: str) -> None:
    extras = re.search(r"\[([\w,]+)\]", command)
    assert extras is not None
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    declared = re.findall(r"^([\w-]+)\s*=", section, re.M)
    for extra in extras.group(1).split(","):
        assert extra in declared, f"{command!r}: pyproject.toml has no extra {extra!r}"


# ---- the folders ----------------------------------------------------------------------------------------------

TRAIN = "python -m ddpm.train"  # README's and the quickstart's first command; its model is shared


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs-shared")
    prepare(root)
    result = run_command(TRAIN, root)
    assert result.returncode == 0, f"{TRAIN} failed:\n{result.stderr[-3000:]}"
    assert (root / "ddpm-fashion-mnist-32" / "model_index.json").is_file()
    return root


def prepare(folder: Path) -> None:
    (folder / "tiny-unet.json").write_text(TINY_UNET)
    images = folder / "my_images"
    images.mkdir()
    for i in range(8):
        Image.effect_noise((12, 12), 40 + 10 * i).save(images / f"{i}.png")


@pytest.fixture
def folder(shared: Path, tmp_path: Path) -> Path:
    prepare(tmp_path)
    (tmp_path / "ddpm-fashion-mnist-32").symlink_to(shared / "ddpm-fashion-mnist-32", target_is_directory=True)
    return tmp_path


# ---- the tests ------------------------------------------------------------------------------------------------

BLOCKS = find_blocks()


def test_the_docs_hold_the_commands_this_file_expects() -> None:
    # A guard against an extraction that silently finds nothing (a changed fence style, a moved file).
    ids = [b.id for b in BLOCKS]
    assert any(i.startswith("README.md") for i in ids) and any(i.startswith("docs/quickstart.md") for i in ids)
    readme = [c for b in BLOCKS if b.path == REPO / "README.md" and b.language == "bash" for c in shell_commands(b.code)]
    assert TRAIN in readme and any(c.startswith("python -m pytest") for c in readme)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_block_runs(block: Block, folder: Path) -> None:
    if block.language == "python":
        preludes = [code for pattern, code, _ in PRELUDES if re.search(pattern, block.code, re.M)]
        result = execute([sys.executable, "-c", "\n".join([*preludes, block.code])], folder)
        assert result.returncode == 0, f"{block.id}:\n{block.code}\n{result.stderr[-3000:]}"
        return
    for command in shell_commands(block.code):
        action, _ = classify(command)
        if action == RUN and command == TRAIN:
            continue  # ran once for the shared model
        if action == RUN:
            result = run_command(command, folder)
            assert result.returncode == 0, f"{block.id}: {command}\n{result.stderr[-3000:]}"
        elif action == PARSE:
            parse_command(command)
        elif action == HELP:
            words = shlex.split(command)
            if words[0] == "python":
                script = words[1] if (folder / words[1]).exists() else str(REPO / words[1])
                words = [sys.executable, script]
            result = execute([*words[:2], "--help"] if words[0] == sys.executable else [words[0], "--help"], folder)
            assert result.returncode == 0, f"{block.id}: {command} --help\n{result.stderr[-3000:]}"
        elif action == EXTRA:
            check_extras(command)
