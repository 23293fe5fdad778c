"""``python -m ddpm.train``: train an unconditional DDPM with train_unconditional.py's flags.

    python -m ddpm.train                                      # bundled Fashion-MNIST, under 5 CPU minutes
    python -m ddpm.train --train_data_dir images --resolution 64 --use_ema
    accelerate launch --multi_gpu --num_processes 2 -m ddpm.train --dataset_name user/dataset --mixed_precision fp16

Bad input gives one line on stderr and exit status 2 (``--debug`` shows the traceback). SIGTERM or Ctrl-C
saves a checkpoint and exits with 143 or 130; resume with ``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from ddpm.cli import run


def main(argv: Sequence[str] | None = None) -> None:
    from ddpm.training import parse_args

    config = parse_args(argv)
    # Keep stderr for our progress bar, warnings and one-line errors (read when datasets is imported).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    from ddpm.training import train

    result = train(config)
    if result.stopped_by is not None:
        code = 128 + int(getattr(signal, result.stopped_by, signal.SIGTERM))
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(run(main, prog="ddpm.train"))
