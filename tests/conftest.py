import os

# Tests never touch the network: a hub lookup fails at once instead of retrying for ~24 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny test tensors gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes small
# convolutions 10-100x slower. One thread for this process and for the CLIs the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
