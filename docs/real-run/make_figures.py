"""Figures and numbers for docs/real-run/README.md from one finished training run.

    python -m ddpm.train --use_ema --num_epochs 16 --eval_epochs 2 --eval_num_images 200 --output_dir RUN
    python docs/real-run/make_figures.py RUN --num_images 128

Writes into docs/real-run/: loss.png and metric.png (from the run's tensorboard scalars and metrics.jsonl),
samples_ddpm1000.png and samples_ddim50.png (EMA weights), real_vs_generated.png, and comparison.json: the
metric for EMA on/off x DDPM 1000 steps / DDIM 50 steps. Needs the docs extra (matplotlib).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm import DDIMScheduler, DDPMScheduler, Pipeline, UNet
from ddpm.checkpoint import load_weights
from ddpm.evaluate import EvalConfig, evaluate, generate, load_real_images
from ddpm.images import make_grid, to_pil

HERE = Path(__file__).resolve().parent


def scalars(run: Path, tag: str) -> tuple[list[int], list[float]]:
    steps: list[int] = []
    values: list[float] = []
    for events in sorted((run / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent)).Reload()
        if tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                steps.append(e.step)
                values.append(e.value)
    return steps, values


def pyplot():
    """matplotlib comes with the docs extra; only the plots need it, so --help works without it."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: the figures need matplotlib: pip install -e '.[docs]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(run: Path) -> None:
    plt = pyplot()
    steps, loss = scalars(run, "loss")
    window = 25
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, loss, color="0.8", lw=0.7, label="loss")
    ax.plot(steps, smooth, color="C0", label=f"mean of {window}")
    ax.set(xlabel="optimiser step", ylabel="MSE loss (epsilon)", yscale="log", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "loss.png", dpi=120)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    ax[0].plot([r["step"] for r in records], [r["fd"] for r in records], "o-")
    ax[0].set(xlabel="optimiser step", ylabel="Fréchet distance", title="FD in the dataset CNN's space")
    for name in ("precision", "recall"):
        ax[1].plot([r["step"] for r in records], [r[name] for r in records], "o-", label=name)
    ax[1].set(xlabel="optimiser step", ylim=(0, 1), title="k-NN precision / recall")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(HERE / "metric.png", dpi=120)


def raw_weights_pipeline(run: Path, out: Path) -> Path:
    """The run's last non-EMA weights (from its newest checkpoint) as a pipeline folder."""
    newest = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    pipe = Pipeline.from_pretrained(run)
    unet = UNet.from_config(pipe.unet.config)
    raw = newest / "unet" / "diffusion_pytorch_model.safetensors"  # checkpoints before the pickle-free format:
    unet.load_state_dict(load_weights(raw if raw.is_file() else newest / "model.safetensors"))  # model.safetensors
    Pipeline(unet=unet, scheduler=pipe.scheduler).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--num_images", type=int, default=128)
    args = p.parse_args()
    plot_training(args.run)

    pipe = Pipeline.from_pretrained(args.run)
    samples = {}
    for name, cls, steps in (("ddpm1000", DDPMScheduler, 1000), ("ddim50", DDIMScheduler, 50)):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        samples[name] = generate(pipe, 64, 64, steps)
        make_grid(to_pil(samples[name]), rows=8, cols=8).save(HERE / f"samples_{name}.png")
    real = load_real_images(None, None, pipe.unet.config.sample_size, channels=pipe.unet.config.in_channels)
    pick = torch.randperm(real.images.shape[0], generator=torch.Generator().manual_seed(1))[:32]
    real_vs_generated = torch.cat([real.images[pick], samples["ddpm1000"][:32]])  # top 4 rows real, bottom generated
    make_grid(to_pil(real_vs_generated), rows=8, cols=8).save(HERE / "real_vs_generated.png")

    raw = raw_weights_pipeline(args.run, args.run / "raw-weights")
    results = []
    for weights, model in (("EMA", args.run), ("no EMA", raw)):
        for scheduler, steps in (("ddim", 50), ("ddpm", 1000)):
            record = evaluate(EvalConfig(model=str(model), num_images=args.num_images, batch_size=args.num_images,
                                         scheduler=scheduler, num_inference_steps=steps, output_dir=str(args.run)))
            results.append({"weights": weights, "scheduler": scheduler, "steps": steps,
                            **{k: record[k] for k in ("fd", "kid", "precision", "recall", "sample_seconds")}})
            print(json.dumps(results[-1]), file=sys.stderr)
    (HERE / "comparison.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
