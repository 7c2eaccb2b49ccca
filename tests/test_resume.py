"""Kill -9 mid-training, `--resume latest`: the run continues exactly (CPU, deterministic mode).
Checkpoints refuse pickled code."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from dalip.checkpoint import list_checkpoints, load_state
from dalip.config import load_train_config
from dalip.errors import CheckpointError
from dalip.train import read_train_log, train

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_shape_shards  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shape_shards(tmp_path_factory.mktemp("shapes"), num_shards=4, per_shard=16)


def _command(shards: Path, runs: Path, name: str, *extra: str) -> list[str]:
    # MBDC dropout stays on (0.5): resuming must restore the RNG too. Two workers: the resumed
    # loader starts mid-epoch at a step that is not a multiple of the worker count.
    return [
        sys.executable, "-m", "dalip.cli", "train", "--train-data", str(shards), "--runs-dir", str(runs),
        "--name", name, "--batch-size", "8", "--steps", str(STEPS), "--save-every", "3", "--workers", "2",
        "--lr", "1e-3", "--warmup", "2", "--deterministic", "--no-progress", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_then_resume_latest_continues_exactly(shards, tmp_path):
    ref = subprocess.run(_command(shards, tmp_path, "ref"), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    expected = [r["loss"] for r in read_train_log(tmp_path / "ref")]
    assert len(expected) == STEPS

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(shards, tmp_path, "killed"), env=_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader workers
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = [int(p.name.split("_")[1]) for p in list_checkpoints(run)]
    assert saved and saved[-1] < STEPS

    resumed = subprocess.run(
        _command(shards, tmp_path, "killed", "--resume", "latest"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoints' / f'step_{saved[-1]:08d}'} at step {saved[-1]}" in resumed.stderr
    rows = read_train_log(run)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))  # no step lost or logged twice
    for step, (got, want) in enumerate(zip([r["loss"] for r in rows], expected), start=1):
        assert got == pytest.approx(want, rel=1e-4), f"step {step}"

    # the resumed run's final weights equal the uninterrupted run's
    last = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    a = safetensors.torch.load_file(str(tmp_path / "ref" / last))
    b = safetensors.torch.load_file(str(run / last))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(shards, tmp_path):
    cfg = load_train_config(
        None, dict(train_data=str(shards), runs_dir=str(tmp_path), name="src", batch_size=8, steps=1, workers=0)
    )
    train(cfg)
    good = list_checkpoints(cfg.run_dir)[-1]
    assert load_state(good)["step"] == 1  # a real checkpoint loads with weights_only

    evil = tmp_path / "evil" / "checkpoints" / good.name
    shutil.copytree(good, evil)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "optimizer": _Payload(marker)}, evil / "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt: refused to load: .*pickled objects.*posix\.system"):
        load_state(evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        train(cfg.model_copy(update={"name": "evil", "resume": "latest"}))
    assert not marker.exists()
