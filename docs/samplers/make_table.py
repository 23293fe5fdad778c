"""The steps-vs-quality table of docs/samplers.md: every sampler at 5, 10, 20 and 50 steps, and DDPM with 1000.

    python -m ddpm.train --use_ema --num_epochs 40 --output_dir fashion-ema-40      # the weights (docs/samplers.md)
    python docs/samplers/make_table.py fashion-ema-40 --num_images 512              # about 16 min on 2 idle cores

Each cell samples the same images (image i from a generator seeded i, as ``ddpm.sample`` and ``ddpm.evaluate`` do)
from the run's saved pipeline (the EMA weights) through ``Pipeline``, and scores them as ``ddpm.evaluate`` does:
Fréchet distance, KID and k-NN precision/recall (``ddpm.metrics``) in the feature space of the dataset CNN trained
on half of the real images, against ``--num_images`` held-out real images from the other half. Every sampler is
swapped onto the model's own schedule exactly as ``ddpm.sample --scheduler NAME`` does (``ddpm.schedulers.sampler``,
so with the saved config's "leading" timestep spacing). Writes ``table.json`` next to this script (one record per
cell) and prints the Markdown table.

How much of a difference is noise: ``table.json`` also holds the Fréchet distance between two disjoint sets of
held-out real images (the floor at this sample size), and the cells in ``REPLICATES`` drawn again from other seeds
(images 512-1023, ...), so each of those has several estimates.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ddpm import metrics
from ddpm.data import load_real_images, split_real_images
from ddpm.pipeline import Pipeline, generate
from ddpm.schedulers import sampler

HERE = Path(__file__).resolve().parent
STEPS = (5, 10, 20, 50)
# (row label, ddpm.sample --scheduler name, settings, eta)
ROWS = [
    ("DDPM", "ddpm", {}, 0.0),
    ("DDIM η=0", "ddim", {}, 0.0),
    ("DDIM η=1", "ddim", {}, 1.0),
    ("DDIM η=0, clip_sample=False", "ddim", {"clip_sample": False}, 0.0),
    ("DPM-Solver++ 2M", "dpm", {}, 0.0),
    ("DPM-Solver++ 3M", "dpm", {"solver_order": 3}, 0.0),
    ("SDE-DPM-Solver++ 2M", "sde-dpm", {}, 0.0),
    ("UniPC (bh2, order 2)", "unipc", {}, 0.0),
    ("Euler", "euler", {}, 0.0),
    ("Heun", "heun", {}, 0.0),
]


# (row label, --scheduler name, settings, steps, extra seed sets): cells drawn again to see the noise of an estimate
REPLICATES = [("DDPM", "ddpm", {}, 50, 2),
              ("DPM-Solver++ 2M", "dpm", {}, 10, 2), ("SDE-DPM-Solver++ 2M", "sde-dpm", {}, 10, 2),
              ("SDE-DPM-Solver++ 2M", "sde-dpm", {}, 20, 2), ("UniPC (bh2, order 2)", "unipc", {}, 10, 2)]


def reference_features(run: Path, num_images: int, extractor_steps: int
                       ) -> tuple[metrics.FeatureExtractor, torch.Tensor, torch.Tensor]:
    """The dataset CNN (cached in the run folder), the features of ``num_images`` held-out real images, and of as
    many other held-out real images (for the floor)."""
    pipe = Pipeline.from_pretrained(run)
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    real = load_real_images(None, None, size, channels)  # the bundled Fashion-MNIST subset the run trained on
    train, pool = split_real_images(real)
    extractor = metrics.dataset_extractor(train.images, train.labels, run, train.description, steps=extractor_steps)
    pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))
    return (extractor, metrics.compute_features(extractor, pool[pick[:num_images]]),
            metrics.compute_features(extractor, pool[pick[num_images:2 * num_images]]))


def cell(pipe: Pipeline, saved: Any, name: str, settings: dict, eta: float, steps: int, num_images: int,
         batch_size: int, extractor: metrics.FeatureExtractor, real: torch.Tensor, seed: int = 0) -> dict:
    """One cell, with the sampler built on the run's ``saved`` scheduler config as ``ddpm.sample`` builds it (not on
    the previous cell's sampler, whose config may lack keys such as clip_sample)."""
    options = {k: v for k, v in settings.items() if k in ("solver_order", "karras_sigmas")}  # sampler()'s own
    pipe.scheduler = sampler(name, saved, **options)
    overrides = {k: v for k, v in settings.items() if k not in options}  # any other config key, set on top
    if overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
    start = time.perf_counter()
    images = generate(pipe, num_images, batch_size, steps, seed=seed, eta=eta, progress=False)
    seconds = time.perf_counter() - start
    scores = metrics.feature_metrics(real, metrics.compute_features(extractor, images))
    return {"scheduler": type(pipe.scheduler).__name__, "steps": steps, "seed": seed,
            "model_calls": len(pipe.scheduler.timesteps), "seconds": round(seconds, 1), "num_images": num_images,
            "timestep_spacing": pipe.scheduler.config.timestep_spacing, **scores}


def markdown(records: list[dict]) -> str:
    by_row: dict[str, dict[int, dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], {})[r["steps"]] = r
    head = "| sampler | " + " | ".join(f"{n} steps" for n in STEPS) + " |"
    lines = [head, "|---" * (len(STEPS) + 1) + "|"]
    for label, cells in by_row.items():
        shown = [f"{c['fd']:.1f} / {c['recall']:.2f} / {c['seconds']:.3g} s" if (c := cells.get(n)) else "—"
                 for n in STEPS]
        if 1000 in cells:
            c = cells[1000]
            shown = [f"1000 steps: {c['fd']:.1f} / {c['recall']:.2f} / {c['seconds']:.0f} s"] + [""] * (len(STEPS) - 1)
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the training run's output_dir (its saved pipeline)")
    p.add_argument("--num_images", type=int, default=512, help="samples per cell, and real images to compare with")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--extractor_steps", type=int, default=1000, help="training steps of the dataset CNN")
    p.add_argument("--out", type=Path, default=HERE / "table.json")
    p.add_argument("--rows", default=None,
                   help="recompute only these rows (labels, separated by ';') and replace them in an existing --out")
    p.add_argument("--replicates_only", action="store_true",
                   help="recompute only the replicate cells and replace them in an existing --out")
    a = p.parse_args()
    extractor, real, other_real = reference_features(a.run, a.num_images, a.extractor_steps)
    pipe = Pipeline.from_pretrained(a.run)
    saved = pipe.scheduler.config  # every cell's sampler is built on this, as ddpm.sample builds it
    pipe.set_progress_bar_config(disable=True)
    jobs = [("DDPM, 1000 steps", "ddpm", {}, 0.0, 1000, 0)] + [(*row, n, 0) for row in ROWS for n in STEPS]
    jobs += [(label, name, settings, 0.0, steps, a.num_images * (k + 1))
             for label, name, settings, steps, extra in REPLICATES for k in range(extra)]
    table: dict = {"real_vs_real_fd": metrics.feature_metrics(real, other_real)["fd"], "cells": [], "replicates": []}
    if a.rows is not None or a.replicates_only:  # keep the other records
        rows = a.rows.split(";") if a.rows is not None else [job[0] for job in jobs]
        jobs = [job for job in jobs if job[0] in rows and (job[5] != 0 or not a.replicates_only)]
        old = json.loads(a.out.read_text())
        keys = ("replicates",) if a.replicates_only else ("cells", "replicates")
        table = {**old, **{key: [r for r in old[key] if r["row"] not in rows] for key in keys}}
    for label, name, settings, eta, steps, seed in tqdm(jobs, desc="cells"):
        record = {"row": label, **cell(pipe, saved, name, settings, eta, steps, a.num_images, a.batch_size,
                                       extractor, real, seed)}
        tqdm.write(json.dumps(record))
        table["cells" if seed == 0 else "replicates"].append(record)
        a.out.write_text(json.dumps(table, indent=1) + "\n")  # after every cell: a long run keeps what it has
    order = ["DDPM, 1000 steps"] + [label for label, *_ in ROWS]
    table["cells"].sort(key=lambda r: (order.index(r["row"]), r["steps"]))
    a.out.write_text(json.dumps(table, indent=1) + "\n")
    print(markdown(table["cells"]))


if __name__ == "__main__":
    main()
