"""The benchmark harness (benchmarks/run.py) on a tiny UNet: the machinery, not the speed."""

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
spec = importlib.util.spec_from_file_location("ddpm_benchmarks_run", PATH)
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)

TINY = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
PLAN = bench.Plan(configs=("tiny",), precisions=("fp32",), forward_batches=(1, 2), backward_batch=2,
                  train_batch=2, repeats=2, warmup=1, memory_steps=0, sampling_configs=("tiny",), sampling_batch=2,
                  sampling=(("ddim", 3), ("ddpm", 4)), sampling_repeats=(1, 2), scheduler_steps=(("ddpm", 20),),
                  scheduler_batch=2, conv_peak_batch=1, profile=True, profile_batches=(1,))


@pytest.fixture(scope="module")
def sides():
    return [bench.make_side("diffusers"), bench.make_side("ddpm")]


@pytest.fixture(scope="module")
def report(sides, tmp_path_factory):
    return bench.run_benchmark(PLAN, sides, torch.device("cpu"), configs={"tiny": TINY}, log=lambda _: None,
                               workdir=tmp_path_factory.mktemp("bench"))


def positive(x):
    return math.isfinite(x) and x > 0


def test_report_has_every_case_with_finite_positive_times(report):
    expected = {(f"tiny {case}", "fp32")
                for case in ("forward b1", "forward b1, ddpm in frozen_weights()", "forward b2",
                             "forward b2, ddpm in frozen_weights()", "forward+backward b2",
                             "train step b2", "train step b2, optimiser and EMA as each trainer makes them",
                             "sampling DDIM 3 steps b2", "sampling DDPM 4 steps b2")}
    expected.add(("scheduler loop DDPM 20 steps b2", "fp32"))
    assert {(r.case, r.precision) for r in report.rows} == expected
    for row in report.rows:
        assert set(row.times) == {"diffusers", "ddpm"}
        assert all(positive(t) for times in row.times.values() for t in times), row
        assert positive(row.ratio("diffusers", "ddpm"))
    sampling = {r.case: r for r in report.rows if "sampling" in r.case and r.precision == "fp32"}
    assert len(sampling["tiny sampling DDIM 3 steps b2"].times["ddpm"]) == 1
    assert len(sampling["tiny sampling DDPM 4 steps b2"].times["ddpm"]) == 2


def test_flops_peaks_memory_and_sampling_overhead(report):
    forward = {r.case: r.flops for r in report.rows if r.precision == "fp32" and r.flops}
    # FLOPs scale with the batch, and a backward pass costs more than a forward one.
    assert forward["tiny forward b2"] == 2 * forward["tiny forward b1"] > 0
    assert forward["tiny forward+backward b2"] > forward["tiny forward b2"]
    assert set(report.peaks) == {"fp32"} and positive(report.peaks["fp32"])
    assert report.memory == []  # memory_steps=0: no subprocesses
    for s in report.sampling:
        for side in ("diffusers", "ddpm"):
            assert 0 < s["inside"][side] < s["total"][side]
    assert 0 <= report.matches["tiny"] < 1e-4


def test_rendered_table_and_profile(report, tmp_path):
    text = bench.render(report, "python benchmarks/run.py --test", 1.0, ("0.1", "0.2"), "hand-written findings")
    results = text[text.index("## Results"):text.index("## Sampling")]
    table = [line for line in results.splitlines() if line.startswith(("| tiny ", "| scheduler"))]
    assert len(table) == len(report.rows)
    assert "## Sampling: time outside the UNet" in text
    assert "hand-written findings" in text and "model name" not in text and "torch " in text
    assert "### tiny, forward batch 1, fp32" in text and "conv2d memory formats" in text
    path = tmp_path / "RESULTS.md"
    path.write_text(text)
    assert bench.previous_findings(path).strip() == "hand-written findings"


def test_memory_table(report):
    gib = 2**30
    fake = [{"config": "tiny", "precision": "fp32", "side": "diffusers", "peak_rss": 2 * gib, "rss_before": gib,
             "times": [1.0]},
            {"config": "tiny", "precision": "fp32", "side": "ddpm", "peak_rss": 1.5 * gib, "rss_before": gib,
             "times": [1.0]}]
    text = bench.render(replace(report, memory=fake), "cmd", 1.0, ("0", "0"), "")
    line = next(line for line in text.splitlines() if line.startswith("| tiny | fp32 | ddpm |"))
    assert line.endswith("| 0.75 ✓ (goal ≤0.8) | 0.50 |")  # whole-process peak 1.5/2; added by training 0.5/1


def test_flop_count_of_a_known_graph():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    assert bench.count_flops(lambda: conv(x)) == 2 * 2 * 8 * 4 * 9 * 25
    q = torch.randn(1, 2, 6, 4)
    assert bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == 4 * 2 * 6 * 6 * 4


def test_training_memory_subprocess(sides, tmp_path):
    _, path = bench.build_models(TINY, sides[:1], tmp_path)
    result = bench.train_memory(sides[1], path, torch.device("cpu"), "fp32", batch=2, steps=2)
    assert len(result["times"]) == 2 and all(positive(t) for t in result["times"])
    # A fresh process: its peak is its own (well below this test process's, which holds torch, diffusers, ...).
    assert result["peak_rss"] >= result["rss_before"] > 50 * 2**20


def test_output_match_check_fails_when_weights_differ(sides, tmp_path):
    models, _ = bench.build_models(TINY, sides, tmp_path)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    assert bench.verify_match(models["diffusers"], models["ddpm"], x, t) < 1e-4
    with torch.no_grad():
        next(models["ddpm"].parameters()).add_(0.1)
    with pytest.raises(bench.OutputMismatch):
        bench.verify_match(models["diffusers"], models["ddpm"], x, t)


def test_bf16_precision_runs_matmuls_in_bf16():
    ctx = bench.autocast(torch.device("cpu"), "bf16")
    with ctx():
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    with bench.autocast(torch.device("cpu"), "fp32")():
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision='fp8'"):
        bench.autocast(torch.device("cpu"), "fp8")


def test_interleaved_timing_alternates_order():
    calls = []
    times = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in times.values())


def test_grayscale_config_with_its_own_batches_and_compiled_rows(sides, tmp_path, monkeypatch):
    # A config like the laptop model (grayscale, its own batch sizes from CONFIG_BATCHES), with the compile rows
    # (through aot_eager here: the machinery, not inductor's speed).
    gray = dict(TINY, in_channels=1, out_channels=1)
    monkeypatch.setitem(bench.CONFIG_BATCHES, "gray", dict(forward_batches=(3,), backward_batch=3, train_batch=3))
    plan = bench.Plan(configs=("gray",), precisions=("fp32",), repeats=2, warmup=1, memory_steps=0,
                      sampling_configs=(), cases=("unet",), profile=False, compile=True, compile_backend="aot_eager",
                      conv_peak_batch=1)
    report = bench.run_benchmark(plan, sides, torch.device("cpu"), configs={"gray": gray}, log=lambda _: None,
                                 workdir=tmp_path)
    cases = [r.case for r in report.rows]
    assert cases == ["gray forward b3", "gray forward b3, ddpm in frozen_weights()", "gray forward+backward b3",
                     "gray train step b3", "gray train step b3, optimiser and EMA as each trainer makes them",
                     "gray torch.compile forward b3", "gray torch.compile forward+backward b3"]
    for row in report.rows:
        assert all(positive(t) for times in row.times.values() for t in times), row
    for row in report.rows[-2:]:
        assert set(row.extra["compile s"]) == {"diffusers", "ddpm"}
    assert bench.CONFIGS["unet-small"]["in_channels"] == 1 and bench.CONFIG_BATCHES["unet-small"]["train_batch"] == 64


def test_compiled_rows_compile_each_time_or_fail(sides, tmp_path, monkeypatch):
    # Dynamo's cache is per code object, shared by every UNet of a class: without emptying it, a second config or
    # precision finds its guards passing (or the recompile limit hit) and runs the UNet eagerly under a
    # "torch.compile" label. compile_rows empties it first, and a first call that makes no graph is an error.
    from benchmarks.harness import build_models
    from benchmarks.unet_cases import compile_rows

    models, _ = build_models(TINY, sides, tmp_path)
    plan = bench.Plan(configs=("tiny",), precisions=("fp32",), forward_batches=(2,), backward_batch=2, repeats=1,
                      compile=True, compile_backend="eager")  # dynamo alone: its graphs are what is counted

    def inputs(batch):
        return torch.randn(batch, 3, 8, 8), torch.randint(0, 1000, (batch,)), torch.randn(batch, 3, 8, 8)

    def rows():
        return compile_rows("tiny", models, sides, plan, torch.device("cpu"), "fp32", {"forward": 1, "backward": 3},
                            inputs, lambda _: None)

    for _ in range(2):  # the second time compiles again
        assert [r.case for r in rows()] == ["tiny torch.compile forward b2", "tiny torch.compile forward+backward b2"]
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    with pytest.raises(RuntimeError, match="made no graph for the diffusers UNet"):
        rows()


def test_trainer_parts_are_each_trainers_own():
    # The "as each trainer makes them" row: diffusers' script steps torch's default AdamW and EMAModel (warmup);
    # ddpm.train on a CPU the fused AdamW and ddpm.ema.EMA; the plain row the same code on both sides.
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    from benchmarks.unet_cases import ReferenceEMA, trainer_parts
    from ddpm.ema import EMA

    model = UNet2DModel(**TINY)
    parts = {library: trainer_parts(model, library, torch.device("cpu")) for library in ("diffusers", "ddpm", None)}
    assert parts["ddpm"].optimizer.defaults["fused"] is True
    assert not parts["diffusers"].optimizer.defaults["fused"] and not parts[None].optimizer.defaults["fused"]
    assert isinstance(parts["diffusers"].ema, EMAModel) and isinstance(parts["ddpm"].ema, EMA)
    assert isinstance(parts[None].ema, ReferenceEMA)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for library in ("diffusers", "ddpm"):
        parts[library].update_ema()  # each library's first update copies the weights (decay 0 at step 1)
    live = [p.detach() for p in model.parameters()]
    assert parts["diffusers"].ema.optimization_step == 1
    assert len(parts["diffusers"].ema.shadow_params) == len(parts["ddpm"].ema.shadow) == len(live) > 0
    assert all(torch.equal(s, p) for s, p in zip(parts["diffusers"].ema.shadow_params, live))
    assert all(torch.equal(s, p) for s, p in zip(parts["ddpm"].ema.shadow.values(), live))
