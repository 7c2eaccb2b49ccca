"""`torchrun --nproc_per_node 2` on CPU (gloo) matches a single process with the same global batch.

With `--data-slots 2` the single process reads both halves of every global batch itself; under DDP
rank r reads half r (see dalip.data). With local loss + gather-with-grad the DDP loss over the gathered
batch equals the single-process loss, so the runs differ only by float summation order. MBDC dropout is
off: its masks are drawn per rank.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dalip.train import read_train_log

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_shape_shards  # noqa: E402

REL_TOL = 1e-4  # measured: about 1e-7 relative on this machine


def _args(shards: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "train", "--train-data", str(shards), "--runs-dir", str(runs), "--name", name, "--batch-size", "16",
        "--steps", "4", "--save-every", "2", "--data-slots", "2", "--mbdc-dropout", "0", "--workers", "0",
        "--lr", "1e-3", "--warmup", "1", "--deterministic", "--no-progress", *extra,
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_torchrun_two_ranks_matches_single_process(tmp_path):
    shards = write_shape_shards(tmp_path / "shapes", num_shards=4, per_shard=16)
    dalip = [sys.executable, "-m", "dalip.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dalip.cli"]

    _run(dalip + _args(shards, tmp_path, "single"))
    _run(torchrun + _args(shards, tmp_path, "ddp"))
    single, ddp = read_train_log(tmp_path / "single"), read_train_log(tmp_path / "ddp")
    assert len(single) == len(ddp) == 4
    for a, b in zip(single, ddp):
        for key in ("loss", "loss_first", "loss_second"):
            assert b[key] == pytest.approx(a[key], rel=REL_TOL), (int(a["step"]), key)
    assert ddp[-1]["samples"] == single[-1]["samples"] == 64

    # A DDP checkpoint resumes on one process: same data layout (2 slots), same continuation.
    cross = tmp_path / "cross" / "checkpoints"
    cross.mkdir(parents=True)
    shutil.copytree(tmp_path / "ddp" / "checkpoints" / "step_00000002", cross / "step_00000002")
    _run(dalip + _args(shards, tmp_path, "cross", "--resume", "latest"))
    resumed = read_train_log(tmp_path / "cross")
    assert [int(r["step"]) for r in resumed] == [3, 4]
    for a, b in zip(resumed, ddp[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=REL_TOL)
