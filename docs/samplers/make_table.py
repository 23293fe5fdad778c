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
"""

import argparse
import json
import time
from pathlib import Path

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
    ("DPM-Solver++ 2M", "dpm", {}, 0.0),
    ("DPM-Solver++ 3M", "dpm", {"solver_order": 3}, 0.0),
    ("SDE-DPM-Solver++ 2M", "sde-dpm", {}, 0.0),
    ("UniPC (bh2, order 2)", "unipc", {}, 0.0),
    ("Euler", "euler", {}, 0.0),
    ("Heun", "heun", {}, 0.0),
]


def reference_features(run: Path, num_images: int, extractor_steps: int) -> tuple[metrics.FeatureExtractor, torch.Tensor]:
    """The dataset CNN (cached in the run folder) and the features of ``num_images`` held-out real images."""
    pipe = Pipeline.from_pretrained(run)
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    real = load_real_images(None, None, size, channels)  # the bundled Fashion-MNIST subset the run trained on
    train, pool = split_real_images(real)
    extractor = metrics.dataset_extractor(train.images, train.labels, run, train.description, steps=extractor_steps)
    pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))
    return extractor, metrics.compute_features(extractor, pool[pick[:num_images]])


def cell(pipe: Pipeline, name: str, settings: dict, eta: float, steps: int, num_images: int, batch_size: int,
         extractor: metrics.FeatureExtractor, real: torch.Tensor) -> dict:
    pipe.scheduler = sampler(name, pipe.scheduler.config, **settings)
    start = time.perf_counter()
    images = generate(pipe, num_images, batch_size, steps, seed=0, eta=eta, progress=False)
    seconds = time.perf_counter() - start
    scores = metrics.feature_metrics(real, metrics.compute_features(extractor, images))
    return {"scheduler": type(pipe.scheduler).__name__, "steps": steps,
            "model_calls": len(pipe.scheduler.timesteps), "seconds": round(seconds, 1), "num_images": num_images,
            "timestep_spacing": pipe.scheduler.config.timestep_spacing, **scores}


def markdown(records: list[dict]) -> str:
    by_row: dict[str, dict[int, dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], {})[r["steps"]] = r
    head = "| sampler | " + " | ".join(f"{n} steps" for n in STEPS) + " |"
    lines = [head, "|---" * (len(STEPS) + 1) + "|"]
    for label, cells in by_row.items():
        shown = [f"{c['fd']:.1f} / {c['recall']:.2f} / {c['seconds']:.0f} s" if (c := cells.get(n)) else "—"
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
    a = p.parse_args()
    extractor, real = reference_features(a.run, a.num_images, a.extractor_steps)
    pipe = Pipeline.from_pretrained(a.run)
    pipe.set_progress_bar_config(disable=True)
    jobs = [("DDPM, 1000 steps", "ddpm", {}, 0.0, 1000)] + [(*row, n) for row in ROWS for n in STEPS]
    records = []
    for label, name, settings, eta, steps in tqdm(jobs, desc="cells"):
        record = {"row": label, **cell(pipe, name, settings, eta, steps, a.num_images, a.batch_size, extractor, real)}
        tqdm.write(json.dumps(record))
        records.append(record)
        a.out.write_text(json.dumps(records, indent=1) + "\n")  # after every cell: a long run keeps what it has
    print(markdown(records))


if __name__ == "__main__":
    main()
