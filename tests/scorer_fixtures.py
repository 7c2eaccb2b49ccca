"""A scorer model for tests: a randomly initialised dalip-tiny open_clip model in `dalip export` layout.

Random weights suffice for plumbing (layouts, resumption, clip-retrieval round trips); tests that judge
curation quality train one (see the demo's bootstrap scorer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import safetensors.torch
import torch

TINY_CONFIG = Path(__file__).resolve().parents[1] / "dalip" / "model_configs" / "dalip-tiny.json"


def write_tiny_scorer(out: Path, seed: int = 0) -> Path:
    """An export directory (dalip.json, dalip-tiny.json, open_clip_model.safetensors) of a random model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if open_clip.get_model_config("dalip-tiny") is None:
        open_clip.add_model_config(str(TINY_CONFIG))
    torch.manual_seed(seed)
    model = open_clip.create_model("dalip-tiny")
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(out / "open_clip_model.safetensors"))
    shutil.copy(TINY_CONFIG, out / "dalip-tiny.json")
    (out / "dalip.json").write_text(json.dumps({"arch": "dalip-tiny", "mbdc": {}, "source_checkpoint": None, "step": 0}))
    return out
