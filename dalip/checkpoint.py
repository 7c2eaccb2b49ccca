"""Training checkpoints that load without unpickling arbitrary objects.

A checkpoint is a directory `runs/<name>/checkpoints/step_NNNNNNNN/`:

    model.safetensors   the DALIP model's weights (base open_clip model + MBDC modules)
    state.pt            torch.save of tensors and plain containers only: optimizer, grad scaler,
                        RNG states, data position, counters; read back with weights_only=True
    meta.json           step, epoch, the training config and versions (human-readable)

The directory is written under a temporary name and renamed into place, so a killed run leaves either a
complete checkpoint or none; `latest` is simply the highest complete step.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from dalip.atomic import atomic_path
from dalip.errors import CheckpointError, first_line

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str | Path, run_dir: Path | None = None) -> Path:
    """A checkpoint directory from 'latest' (in run_dir), a run directory, or a checkpoint directory."""
    if str(spec) == "latest":
        if run_dir is None:
            raise CheckpointError("'latest' needs a run directory")
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"no checkpoint to resume in {Path(run_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(spec)
    if (path / META_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
    raise CheckpointError(f"not a checkpoint or a run directory with checkpoints: {path}")


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain containers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write a checkpoint atomically; then delete all but the newest `keep`. Returns its directory."""
    final = checkpoint_dir(run_dir, step)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / META_FILE}: unreadable ({e})") from None


def load_model_weights(model: torch.nn.Module, path: Path, strict: bool = True) -> None:
    """Load model.safetensors of a checkpoint (or a .safetensors file) into `model`."""
    file = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(file), strict=False)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: cannot load model weights ({e})") from None
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{file}: weights do not fit the model ({first_line(e)})") from None
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{file}: weights do not match the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def load_state(path: Path) -> dict[str, Any]:
    """state.pt of a checkpoint, refusing anything but tensors and plain containers."""
    file = Path(path) / STATE_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{file}: refused to load: it holds pickled objects other than tensors and plain containers, "
            f"which could run code ({detail.strip() or 'weights_only check failed'})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        size = file.stat().st_size
        raise CheckpointError(f"{file}: unreadable checkpoint state ({'empty file' if size == 0 else first_line(e)}); "
                              "resume from another checkpoint or delete this one") from None
