"""benchmarks/train_e2e.py --quick: both whole training jobs run under the probe and report; nothing about speed."""

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("ddpm_benchmarks_train_e2e", ROOT / "benchmarks" / "train_e2e.py")
assert spec is not None and spec.loader is not None
e2e = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = e2e
spec.loader.exec_module(e2e)


def test_quick_run_reports_both_jobs(tmp_path, capsys):
    report = e2e.main(["--quick", "--json", str(tmp_path / "e2e.json")])
    for side in ("ddpm", "diffusers"):
        (run,) = report["runs"][side]
        assert run["steps"] == 8  # 32 images, batch 8, 2 epochs: both trainers took every step
        for key in ("wall_s", "startup_s", "teardown_s", "steps_per_s", "loop_steps_per_s", "data_ms_per_batch",
                    "data_ms_median"):
            assert math.isfinite(run[key]) and run[key] > 0, (side, key)
        assert run["startup_s"] + run["teardown_s"] < run["wall_s"]
        assert run["steps_per_s"] < run["loop_steps_per_s"]  # the job includes start-up and saving
        assert len(run["losses"]) == 8 and len(run["data_ms"]) >= 8
        assert run["peak_rss_mb"] > 100  # torch alone is more
        assert math.isfinite(run["final_loss"]) and 0 < run["final_loss"] < 10
    assert json.loads((tmp_path / "e2e.json").read_text())["runs"] == report["runs"]
    # The reference script is fetched into the temporary folder at run time, never kept in the repository.
    assert Path(report["script"]).name == "train_unconditional.py"
    assert not Path(report["script"]).exists() and ROOT not in Path(report["script"]).parents
    table = capsys.readouterr().out
    for label, _, _ in e2e.ROWS:
        assert label in table
    assert "| ddpm | diffusers | diffusers / ddpm |" in table


def test_the_job_config_is_unet_small_in_rgb(tmp_path):
    e2e.write_config(tmp_path / "config.json", quick=False, resolution=32)
    config = json.loads((tmp_path / "config.json").read_text())
    small = json.loads(e2e.SMALL_UNET.read_text())
    assert config == {**small, "in_channels": 3, "out_channels": 3, "sample_size": 32}
