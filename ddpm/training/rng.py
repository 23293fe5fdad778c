"""Every random number generator a training process draws from, saved and restored without pickle.

One safetensors file per process (``rng_state_<rank>.safetensors`` in a checkpoint): torch's CPU generator and
each CUDA device's as byte tensors, numpy's Mersenne Twister keys and python's ``random`` state words as int64
tensors, and their few scalars (numpy's position and cached Gaussian, python's version and cached Gaussian) as
JSON in the file's metadata. Restoring all of them is what makes a resumed run draw the same noise and timesteps
as a run that never stopped.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

logger = logging.getLogger(__name__)


def state_bytes() -> bytes:
    """This process's RNG states as safetensors: torch (CPU and each CUDA device), numpy and python."""
    from safetensors.torch import save

    numpy_state = cast(tuple[Any, ...], np.random.get_state())  # ("MT19937", keys[624], pos, has_gauss, cached)
    version, words, gauss_next = random.getstate()  # words: 624 state words and the position
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
        "python_words": torch.tensor(words, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = cuda_state
    metadata = {
        "numpy": json.dumps([numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])]),
        "python": json.dumps([version, gauss_next]),
    }
    return save(tensors, metadata=metadata)


def restore(rng_path: Path) -> None:
    """Set every generator of this process from a file of ``state_bytes``. A malformed file is a ``ValueError``;
    CUDA states that do not fit this machine's GPUs are skipped with a warning that the resume is not exact."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(rng_path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        name, pos, has_gauss, cached = json.loads(metadata["numpy"])
        version, gauss_next = json.loads(metadata["python"])
        torch.set_rng_state(tensors["torch_cpu"])
        np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate((version, tuple(int(w) for w in tensors["python_words"].tolist()), gauss_next))
    except (KeyError, ValueError, TypeError, RuntimeError, OSError, SafetensorError) as e:
        raise ValueError(f"{rng_path} is not a random-state file ({type(e).__name__}: {e})") from None
    if torch.cuda.is_available():
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("warning: %s holds no CUDA random state for this machine's %d GPU(s) (written on another "
                           "machine?): this resume is NOT bit-exact", rng_path, torch.cuda.device_count())
