"""ddpm.metrics and ``python -m ddpm.evaluate``: closed-form checks of the statistics, sanity checks on real
data (the UCI digits in tests/data) that show the metric can fail, user-supplied extractors, and the CLI.

The digits are split 900 (the extractor's training images, the reference) / 897 (held out). Figures measured
with the library default, a 64-d classifier trained 1000 steps: held-out real FID 2.6 (P 0.87, R 0.93); noisy
(sigma 0.1 / 0.2 / 0.3 / 0.5 in [-1, 1]) 2.7 / 4.1 / 7.7 / 24; two classes 372 with recall 0.19; Gaussian noise
254 with P and R < 0.01. The tests train 40 steps of batch 256 to stay fast: 2.0, 3.4 (sigma 0.3), 205 (R 0.20)
and 156 (P 0.05, R 0.01).
"""

import gzip
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DDPMScheduler, Pipeline, UNet, data, evaluate
from ddpm import metrics as M
from ddpm.cli import run

DATA = Path(__file__).resolve().parent / "data"


# ---- closed form ---------------------------------------------------------------------------------------------

def random_spd(d, seed):
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(g.normal(size=(d, d)))
    return q @ np.diag(g.uniform(0.2, 3.0, size=d)) @ q.T


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    # One dimension: d^2 = (m1 - m2)^2 + (s1 - s2)^2.
    d = M.frechet_distance_from_stats(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]),
                                      torch.tensor([[9.0]]))
    assert d == pytest.approx(3.0**2 + (2.0 - 3.0) ** 2, rel=1e-12)
    # Diagonal (commuting) covariances: |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 2.0, 5.0]), np.array([4.0, 0.5, 5.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    d = M.frechet_distance_from_stats(torch.tensor(mu1), torch.tensor(np.diag(a)), torch.tensor(mu2),
                                      torch.tensor(np.diag(b)))
    assert d == pytest.approx(expected, rel=1e-12)
    # General covariances: tr((C1 C2)^(1/2)) from the eigenvalues of the non-symmetric product itself.
    c1, c2 = random_spd(6, 1), random_spd(6, 2)
    mu1, mu2 = np.arange(6.0), np.ones(6)
    tr_sqrt = np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    d = M.frechet_distance_from_stats(torch.tensor(mu1), torch.tensor(c1), torch.tensor(mu2), torch.tensor(c2))
    assert d == pytest.approx(expected, rel=1e-10)
    assert M.frechet_distance_from_stats(torch.tensor(mu1), torch.tensor(c1), torch.tensor(mu1),
                                         torch.tensor(c1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples_converges_to_the_population_value():
    c1, c2 = random_spd(3, 3), random_spd(3, 4)
    mu1, mu2 = np.zeros(3), np.array([0.5, -0.5, 1.0])
    tr_sqrt = np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    g = np.random.default_rng(0)
    a = g.multivariate_normal(mu1, c1, size=40_000)
    b = g.multivariate_normal(mu2, c2, size=40_000)
    assert M.frechet_distance(a, b) == pytest.approx(expected, abs=0.05)
    assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-9)
    mu, cov = M.mean_and_covariance(a)
    np.testing.assert_allclose(cov.numpy(), np.cov(a, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(mu.numpy(), a.mean(0), rtol=1e-10)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(5, 3)), g.normal(1.0, 1.0, size=(5, 3))

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    m = 5
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = M.kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-9)  # every subset is the whole set, reordered


def test_kid_subsets_match_a_numpy_reference_by_either_path(monkeypatch):
    # Each subset's MMD^2 from the numpy formula on the same random subsets (drawn as documented: one generator
    # seeded `seed`, a permutation of each set per subset), against both ways of computing the kernels: every
    # pair's kernel once and gathered (the default here: 50^2 + 60^2 + 50*60 entries < 3 * 40 * 20^2), and one
    # kernel per subset (forced by a zero memory budget).
    g = np.random.default_rng(2)
    a, b = g.normal(size=(50, 6)), g.normal(0.3, 1.0, size=(60, 6))
    generator, estimates = torch.Generator().manual_seed(7), []
    for _ in range(40):
        i = torch.randperm(50, generator=generator)[:20].numpy()
        j = torch.randperm(60, generator=generator)[:20].numpy()
        kxx, kyy, kxy = ((u @ v.T / 6 + 1) ** 3 for u, v in ((a[i], a[i]), (b[j], b[j]), (a[i], b[j])))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (20 * 19)
        estimates.append(within - 2 * kxy.mean())
    expected = (np.mean(estimates), np.std(estimates, ddof=1))
    gathered = M.kernel_inception_distance(a, b, num_subsets=40, subset_size=20, seed=7)
    monkeypatch.setattr(M, "KID_KERNEL_BYTES", 0)
    per_subset = M.kernel_inception_distance(a, b, num_subsets=40, subset_size=20, seed=7)
    np.testing.assert_allclose(gathered, expected, rtol=1e-12)
    np.testing.assert_allclose(per_subset, expected, rtol=1e-12)


def test_kid_is_about_zero_for_one_distribution_and_positive_for_two():
    g = np.random.default_rng(1)
    a, b = g.normal(size=(600, 8)), g.normal(size=(600, 8))
    same, same_std = M.kernel_inception_distance(a, b, num_subsets=20, subset_size=300)
    shifted, _ = M.kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3 and abs(same) < 0.02
    assert shifted > 0.3 and shifted > 20 * abs(same)


def test_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [9.0]])  # 1-NN radii 1, 1, 1, 7
    fake = torch.tensor([[0.5], [2.5], [5.0], [20.0], [30.0]])  # 1-NN radii 2, 2, 2.5, 10, 10
    precision, recall = M.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(3 / 5)  # 0.5, 2.5 and 5 lie in real balls; 20 and 30 do not
    assert recall == pytest.approx(3 / 4)  # 0, 1, 2 lie in fake balls; 9 is 4 from 5 (> 2.5) and 11 from 20 (> 10)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 5, generator=g)
    assert M.precision_recall(a, a.clone()) == (1.0, 1.0)
    assert M.precision_recall(a, a + 100) == (0.0, 0.0)


@pytest.mark.parametrize("case", ["rank", "rows", "dims", "nan"])
def test_bad_feature_sets_are_named(case):
    a = torch.randn(10, 4)
    b = {"rank": torch.randn(10, 4, 1), "rows": torch.randn(1, 4), "dims": torch.randn(10, 3),
         "nan": torch.full((10, 4), float("nan"))}[case]
    with pytest.raises(ValueError, match="features_b|mismatched|dimensions"):
        if case == "dims":
            M.kernel_inception_distance(a, b)
        else:
            M.kernel_inception_distance(a, b, subset_size=5)
    with pytest.raises(ValueError, match="generated"):
        M.precision_recall(a, b)


# ---- real data: the metric must tell real from broken ----------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    raw = np.loadtxt(gzip.open(DATA / "digits.csv.gz"), delimiter=",")
    images = torch.tensor(raw[:, :64], dtype=torch.float32).reshape(-1, 1, 8, 8) / 8 - 1  # 0..16 -> [-1, 1]
    labels = torch.tensor(raw[:, 64], dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    return {"ref": images[:900], "ref_labels": labels[:900], "held": images[900:], "held_labels": labels[900:]}


@pytest.fixture(scope="module")
def classifier(digits):
    net = M.train_extractor(digits["ref"], digits["ref_labels"], steps=40, batch_size=256, seed=0)
    assert M.task_accuracy(net, digits["held"], digits["held_labels"]) > 0.9
    return net


@pytest.fixture(scope="module")
def scores(digits, classifier):
    held, g = digits["held"], torch.Generator().manual_seed(1)
    sets = {
        "held_out": held,
        "noisy": (held + 0.3 * torch.randn(held.shape, generator=g)).clamp(-1, 1),
        "two_classes": held[digits["held_labels"] < 2],
        "gaussian_noise": torch.randn(held.shape, generator=g).clamp(-1, 1),
    }
    real = M.compute_features(classifier, digits["ref"])  # once, rather than in each evaluate_images call
    out = {name: M.feature_metrics(real, M.compute_features(classifier, images), kid_subsets=20)
           for name, images in sets.items()}
    print({name: {k: round(v, 3) for k, v in s.items()} for name, s in out.items()})
    return out


def test_held_out_real_images_score_near_zero(scores):
    s = scores["held_out"]
    assert s["fd"] < 6
    assert abs(s["kid"]) < 3 * s["kid_std"] + 1.0
    assert s["precision"] > 0.8 and s["recall"] > 0.8


def test_noise_corrupted_images_score_worse(scores):
    assert scores["noisy"]["fd"] > 1.4 * scores["held_out"]["fd"]
    assert scores["noisy"]["kid"] > scores["held_out"]["kid"] + 3 * scores["noisy"]["kid_std"]
    assert scores["noisy"]["precision"] < scores["held_out"]["precision"]


def test_two_classes_have_low_recall(scores):
    s = scores["two_classes"]
    assert s["recall"] < 0.35  # 2 of 10 classes cover about a fifth of the real images
    assert s["precision"] > 0.8  # but what is there looks real
    assert s["fd"] > 20 * scores["held_out"]["fd"]


def test_gaussian_noise_scores_far_worse(scores):
    s = scores["gaussian_noise"]
    assert s["fd"] > 30 * scores["held_out"]["fd"] and s["fd"] > 10 * scores["noisy"]["fd"]
    assert s["precision"] < 0.1 and s["recall"] < 0.1


def test_rotation_extractor_for_unlabelled_images(digits):
    net = M.train_extractor(digits["ref"], None, steps=40, batch_size=256, seed=0)
    assert net.config.task == "rotation" and net.config.num_outputs == 4
    assert M.task_accuracy(net, digits["held"]) > 0.7  # chance is 0.25
    g = torch.Generator().manual_seed(2)
    held = M.evaluate_images(digits["held"], digits["ref"], net, kid_subsets=5)
    noise = M.evaluate_images(torch.randn(digits["held"].shape, generator=g).clamp(-1, 1), digits["ref"], net,
                              kid_subsets=5)
    assert noise["fd"] > 10 * held["fd"]
    assert held["precision"] > 0.7 > noise["precision"]


def test_extractor_is_deterministic_and_cached_per_dataset(digits, tmp_path):
    images, labels = digits["ref"][:300], digits["ref_labels"][:300]
    rng = torch.get_rng_state()
    messages: list[str] = []
    first = M.dataset_extractor(images, labels, tmp_path / "a", "digits", steps=3, log=messages.append)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert len(messages) == 1 and "training" in messages[0]
    [weights] = (tmp_path / "a" / "feature_extractors").glob("*.safetensors")
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["description"] == "digits" and card["config"]["task"] == "classes" and card["num_images"] == 300
    again = M.dataset_extractor(images, labels, tmp_path / "a", "digits", steps=3, log=messages.append)
    assert len(messages) == 1  # loaded, not retrained
    elsewhere = M.dataset_extractor(images, labels, tmp_path / "b", steps=3, log=None)  # trained anew
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]) and torch.equal(value, elsewhere.state_dict()[name])
    torch.testing.assert_close(first(images), again(images), rtol=0, atol=0)
    # Another resolution, other pixels or no labels is another dataset: a second cache entry.
    M.dataset_extractor(torch.nn.functional.interpolate(images, size=16), labels, tmp_path / "a", steps=5, log=None)
    M.dataset_extractor(images, None, tmp_path / "a", steps=5, log=None)
    assert len(list((tmp_path / "a" / "feature_extractors").glob("*.safetensors"))) == 3
    other_seed = M.train_extractor(images, labels, steps=3, seed=1)
    assert not torch.equal(other_seed.features.weight, first.features.weight)


# ---- user-supplied extractors ----------------------------------------------------------------------------------

class Projection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.proj(x.flatten(1))


def test_torchscript_and_export_files_and_callables(digits, tmp_path):
    torch.manual_seed(0)
    module = Projection().eval()
    x = digits["held"][:200]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, but users have such files
        torch.jit.trace(module, x[:2]).save(str(tmp_path / "proj.pt"))
    torch.export.save(torch.export.export(module, (x[:2],), dynamic_shapes=({0: torch.export.Dim("n")},)),
                      tmp_path / "proj.pt2")
    with torch.no_grad():
        expected = module(x).double()
    for name in ("proj.pt", "proj.pt2"):
        loaded = M.load_extractor(tmp_path / name)
        torch.testing.assert_close(M.compute_features(loaded, x, batch_size=64), expected)
        scores = M.evaluate_images(x[:100], x[100:], loaded, kid_subsets=5)
        by_callable = M.evaluate_images(x[:100], x[100:], lambda imgs: module(imgs), kid_subsets=5)
        for key in ("fd", "kid", "precision", "recall"):
            assert scores[key] == pytest.approx(by_callable[key], rel=1e-5, abs=1e-6)
    # Pixels as features, by a plain function: identical sets are at distance 0.
    same = M.evaluate_images(x, x.clone(), lambda imgs: imgs.flatten(1), kid_subsets=2)
    assert same["fd"] == pytest.approx(0.0, abs=1e-6) and same["precision"] == same["recall"] == 1.0

    (tmp_path / "bad.pt").write_text("not a model")
    with pytest.raises(ValueError, match="bad.pt"):
        M.load_extractor(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        M.load_extractor(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"\[N x D\]"):
        M.compute_features(lambda imgs: imgs, x)
    with pytest.raises(ValueError, match="feature_extractor failed"):
        M.compute_features(M.load_extractor(tmp_path / "proj.pt"), torch.zeros(4, 3, 8, 8))


# ---- python -m ddpm.evaluate -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"))
    path = tmp_path_factory.mktemp("pipe") / "tiny"
    Pipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=3)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def digit_folder(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    for i, (image, label) in enumerate(zip(digits["ref"][:120], digits["ref_labels"][:120])):
        (root / f"class_{int(label)}").mkdir(exist_ok=True)
        pixels = ((image[0] + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(root / f"class_{int(label)}" / f"{i:04d}.png")
    (root / "class_0" / "broken.png").write_text("not an image")  # skipped with a warning
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ddpm.evaluate", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def run_in_process(capsys, *args):
    """The CLI's main behind ddpm.cli.run, in this process (no interpreter start-up): (status, stdout, stderr)."""
    status = run(evaluate.main, list(map(str, args)), prog="ddpm.evaluate")
    out, err = capsys.readouterr()
    return status, out, err


def test_evaluate_cli_appends_metrics_and_reuses_the_cache(tiny_pipeline, digit_folder, tmp_path, capsys):
    args = ("--model", tiny_pipeline, "--num_images", 24, "--batch_size", 16, "--num_inference_steps", 3,
            "--train_data_dir", digit_folder, "--extractor_steps", 5, "--output_dir", tmp_path,
            "--cache_dir", tmp_path / "hf")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "training the feature extractor" in first.stdout and "24/24" in first.stderr  # the sampling bar
    assert "training the feature network" in first.stderr and "5/5" in first.stderr  # and the network's
    assert "broken.png" in first.stderr
    status, out, err = run_in_process(capsys, *args, "--scheduler", "ddpm", "--seed", 1)
    assert status == 0, err
    assert "training the feature" not in out + err  # the cached extractor is reused
    assert len(list((tmp_path / "feature_extractors").glob("*.safetensors"))) == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["scheduler"] for r in records] == ["DPMSolverMultistepScheduler", "DDPMScheduler"]  # the default, then --scheduler
    # the steps that ran: a multistep solver has 2 distinct steps on a 3-timestep model (docs/parity.md), DDPM 3
    assert [r["num_inference_steps"] for r in records] == [2, 3]
    for r in records:
        assert r["num_images"] == r["num_real_images"] == 24
        assert r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and np.isfinite(r["kid"])
        assert "fid" not in r  # not Inception's space: not an FID
        assert r["feature_extractor"] == "ddpm dataset CNN (classes, 64-d)"  # class sub-folders are labels
        assert r["weights"] == "pipeline" and "step" not in r
    assert "in the feature space of ddpm dataset CNN (classes, 64-d)" in first.stdout
    assert "not comparable with published FIDs" in first.stdout
    for name in ("fd", "kid", "precision", "recall"):  # the printed table
        assert f"{name} " in first.stdout and f"{records[0][name]:10.4f}" in first.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    fd = events.Scalars("eval/fd")
    assert [e.step for e in fd] == [0, 1]
    assert [e.value for e in fd] == pytest.approx([r["fd"] for r in records], rel=1e-5)


def test_evaluate_a_checkpoint_logs_into_its_run_at_its_step(tiny_pipeline, digit_folder, tmp_path, capsys):
    # A checkpoint as contract 1 lays it out (ddpm.train's): scores go to the run folder, at the checkpoint's step.
    run_dir = tmp_path / "run"
    pipe = Pipeline.from_pretrained(tiny_pipeline)
    pipe.unet.save_pretrained(run_dir / "checkpoint-40" / "unet")
    pipe.unet.save_pretrained(run_dir / "checkpoint-40" / "unet_ema")
    pipe.scheduler.save_pretrained(run_dir / "checkpoint-40" / "scheduler")
    status, out, err = run_in_process(capsys, "--model", run_dir / "checkpoint-40", "--num_images", 8,
                                      "--num_inference_steps", 2, "--train_data_dir", digit_folder,
                                      "--extractor_steps", 2, "--cache_dir", tmp_path / "hf")
    assert status == 0, err
    record = json.loads((run_dir / "metrics.jsonl").read_text())
    assert record["step"] == 40 and record["weights"] == "ema"
    assert not (run_dir / "checkpoint-40" / "metrics.jsonl").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fd")] == [40]


def test_evaluate_defaults_are_fast(tmp_path):
    # The defaults the docs promise run in minutes on a 2-core CPU: 500 images, 20 SDE-DPM-Solver++ steps, 300 CNN
    # steps.
    from ddpm.cli import open_pipeline

    config = evaluate.parse_args(["--model", "m"])
    assert config == evaluate.EvalConfig(model="m")  # the CLI and the Python API agree
    assert (config.num_images, config.scheduler, config.num_inference_steps, config.extractor_steps) == \
        (500, "sde-dpm", None, 300)
    torch.manual_seed(0)
    unet = UNet(sample_size=8, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    Pipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "m")  # 1000 training steps
    loaded = open_pipeline(str(tmp_path / "m"))
    assert loaded.num_inference_steps == 20  # None: the sampler's own count
    assert loaded.pipeline.scheduler.config.algorithm_type == "sde-dpmsolver++"


def test_inception_needs_torch_fidelity_one_line_error(tiny_pipeline, digit_folder, tmp_path, capsys, monkeypatch):
    # The extra is not installed in CI: pretend the package is missing either way, and check the message.
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_fidelity"
                        else real_find_spec(name, *a))
    status, _, err = run_in_process(capsys, "--model", tiny_pipeline, "--feature_extractor", "inception",
                                    "--num_images", 8, "--train_data_dir", digit_folder, "--output_dir", tmp_path)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'pip install "ddpm[inception]"' in lines[0], err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_inception_without_weights_says_where_to_put_them(tiny_pipeline, digit_folder, tmp_path, capsys, monkeypatch):
    # The package "installed" (a stand-in spec), the weights not: the error names the file and where to get it.
    import importlib.machinery
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "torch_fidelity" else real_find_spec(name, *a))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    status, _, err = run_in_process(capsys, "--model", tiny_pipeline, "--feature_extractor", "inception",
                                    "--num_images", 8, "--train_data_dir", digit_folder, "--output_dir", tmp_path)
    assert status == 2
    lines = err.strip().splitlines()
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert len(lines) == 1 and str(expected) in lines[0] and M.INCEPTION_WEIGHTS_URL in lines[0], err
    assert not (tmp_path / "metrics.jsonl").exists()
    # A weights file that is a pickle running code is refused before torch-fidelity would open it.
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    status, _, err = run_in_process(capsys, "--model", tiny_pipeline, "--feature_extractor", "inception",
                                    "--num_images", 8, "--train_data_dir", digit_folder, "--output_dir", tmp_path)
    assert status == 2 and "refused" in err and len(err.strip().splitlines()) == 1, err


def test_library_modules_do_not_import_the_command_line_layer():
    code = "import sys, ddpm.data, ddpm.metrics, ddpm.pipeline; print(sorted(m for m in sys.modules if m == 'ddpm.cli'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("case", ["missing", "not_a_pipeline", "bad_extractor", "resolution"])
def test_evaluate_cli_bad_input_is_one_line(tiny_pipeline, digit_folder, tmp_path, capsys, case):
    (tmp_path / "bad.pt").write_text("not a model")
    model = {"missing": tmp_path / "nope", "not_a_pipeline": tmp_path}.get(case, tiny_pipeline)
    extra = {"bad_extractor": ("--feature_extractor", tmp_path / "bad.pt"), "resolution": ("--resolution", 16)}
    status, _, err = run_in_process(capsys, "--model", model, "--num_images", 8, "--num_inference_steps", 2,
                                    "--train_data_dir", digit_folder, "--output_dir", tmp_path / "out",
                                    *extra.get(case, ()))
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm.evaluate: error:"), err
    assert {"missing": "nope", "not_a_pipeline": "not a pipeline", "bad_extractor": "bad.pt",
            "resolution": "sample_size"}[case] in lines[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_capped_real_images_come_from_every_class_folder(tmp_path, monkeypatch):
    # An image folder lists its class folders in order: a cap taken from the front would see only class "a".
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(folder / cls / f"{i}.png")
    monkeypatch.setattr(data, "MAX_REAL_IMAGES", 6)
    real = data.load_real_images(None, str(folder), 8, 3, cache_dir=str(tmp_path / "cache"))
    assert real.images.shape == (6, 3, 8, 8)
    assert real.labels is not None and set(real.labels.tolist()) == {0, 1}
    monkeypatch.setattr(data, "MAX_REAL_IMAGES", 100)  # not capped: every image, in the source's order
    everything = data.load_real_images(None, str(folder), 8, 3, cache_dir=str(tmp_path / "cache"))
    assert everything.labels is not None and everything.labels.tolist() == [0] * 6 + [1] * 6
