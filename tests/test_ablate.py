"""`plantmix ablate`: config validation, the dry-run plan, and a reduced ablation end to end, killed
during a proxy run and resumed (finished runs are not redone; points.csv equals an uninterrupted
run's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from plantmix.ablate import AblationConfig, ablation_plan, load_ablation, run_ablation
from plantmix.core.errors import PlantmixError

sys.path.insert(0, str(Path(__file__).parent))
from mixbuild import kept, make_build  # noqa: E402
from test_data import write_shape_shards  # noqa: E402
from test_mixlaw import one_error_line, run_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RATIOS = [0.2, 0.4, 0.6, 0.8]


def write_configs(root: Path, steps: int = 3) -> dict:
    """A dalip train config, an eval config with one validation set per domain, and the ablation."""
    root.mkdir(parents=True, exist_ok=True)
    plant = write_shape_shards(root / "val_plant", num_shards=1, per_shard=16, seed=21, prefix="p")
    general = write_shape_shards(root / "val_general", num_shards=1, per_shard=16, seed=22, prefix="g")
    (root / "train.yaml").write_text(yaml.safe_dump(
        {"model": "dalip-tiny", "train_data": "unused", "batch_size": 8, "lr": 1e-3, "warmup": 1, "workers": 0,
         "deterministic": True, "save_every": 1, "keep_checkpoints": 2, "log_every": 1, "progress": False}))  # fmt: skip
    (root / "eval.yaml").write_text(yaml.safe_dump(
        {"validation": [{"name": "vp", "shards": str(plant), "domain": "plant"},
                        {"name": "vg", "shards": str(general), "domain": "general"}],
         "loss_batch_size": 8, "batch_size": 16}))  # fmt: skip
    return {"name": "t", "ratios": RATIOS, "total": 40, "seeds": [0], "mix": {"shard_size": 20},
            "train": {"config": str(root / "train.yaml"), "steps": steps}, "eval": {"config": str(root / "eval.yaml")},
            "suggest": {"weights": {"plant": 0.5, "general": 0.5}}, "torch_threads": 1}  # fmt: skip


def test_config_errors_are_one_line(tmp_path, capsys, monkeypatch):
    base = write_configs(tmp_path / "c")
    cases = [
        ({"ratios": [0.2, 1.4, 0.5]}, "ratio 1.4 is outside [0, 1]"),
        ({"ratios": [0.2, 0.5]}, "at least 3 items"),
        ({"suggest": {}}, "give exactly one of weights or general_tolerance"),
        ({"mix": {"ratio": 0.5}}, "mix may not set ['ratio']"),
        ({"target_step": 100}, "needs train.eval_every"),
    ]
    for change, needle in cases:
        path = tmp_path / "a.yaml"
        path.write_text(yaml.safe_dump({"ablation": {**base, **change}}))
        code, _, err = run_cli(["ablate", path, "--build", tmp_path / "b"], capsys, monkeypatch)
        one_error_line(code, err, needle)


def test_dry_run_plan_counts_runs_and_hours(tmp_path):
    cfg = AblationConfig(**{**write_configs(tmp_path), "seeds": [0, 1], "throughput": 8.0, "train": {"config": str(tmp_path / "train.yaml"), "steps": 90}})
    plan = ablation_plan(cfg)
    assert (plan["proxy_runs"], plan["runs"], plan["samples_per_run"]) == (8, 9, 720)
    assert plan["hours_per_run"] == pytest.approx(720 / 8.0 / 3600)


def test_flagship_recipe_has_an_ablation_plan(capsys, monkeypatch):
    cfg, recipe = load_ablation(Path("pipelines/plantmix-13m.yaml"))
    plan = ablation_plan(cfg)
    assert len(cfg.ratios) >= 5 and recipe.name == "plantmix-13m"
    assert plan["hours_per_run"] == pytest.approx(5000 * 1024 / 1500 / 3600)
    code, out, err = run_cli(["build", "pipelines/plantmix-13m.yaml", "--dry-run"], capsys, monkeypatch)
    assert code == 0 and "Mixing-law ablation 'plantmix-13m'" in out + err and "GPU-h" in out + err


def _ablate_subprocess(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "plantmix.cli", "ablate", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


@pytest.mark.slow
def test_reduced_ablation_killed_and_resumed_matches_uninterrupted(tmp_path):
    build = make_build(tmp_path / "build")
    assert min(kept(build).values()) >= 40 * 0.8
    base = write_configs(tmp_path / "cfg")
    reference = run_ablation(AblationConfig(**{**base, "name": "ref"}), build)
    out_ref = build / "ablations" / "ref"
    for name in ("points.csv", "mixlaw.json", "suggest.json", "report.md", "mixlaw.png"):
        assert (out_ref / name).is_file(), name
    assert reference["confirmation"]["observed"].keys() == {"plant", "general"}
    assert "## Confirmation run" in (out_ref / "report.md").read_text()

    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({"ablation": {**base, "name": "killed", "build": str(build)}}))
    runs = build / "ablations" / "killed" / "runs"
    proc = _ablate_subprocess(path)
    deadline = time.monotonic() + 300
    while not list((runs / "r0.6-s0" / "checkpoints").glob("step_*")):  # the third run is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in runs.glob("r0.[24]-s0/**/*") if p.is_file()}
    assert not (build / "ablations" / "killed" / "points.csv").exists()

    proc = _ablate_subprocess(path)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "r0.2-s0: done earlier" in log and "r0.4-s0: done earlier" in log
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished runs untouched
    killed = build / "ablations" / "killed"
    assert (killed / "points.csv").read_text() == (out_ref / "points.csv").read_text()
    assert json.loads((killed / "suggest.json").read_text())["ratio"] == reference["suggestion"]["ratio"]


def test_missing_build_without_recipe_is_an_error(tmp_path):
    cfg = AblationConfig(**write_configs(tmp_path))
    with pytest.raises(PlantmixError, match="no manifest.parquet"):
        run_ablation(cfg, tmp_path / "nothing")
