"""Export a trained checkpoint's base model in a form open_clip loads by itself.

    out/
      open_clip_model.safetensors   the base open_clip model's state dict (no MBDC)
      <arch>.json                   its open_clip model config
      open_clip_config.json         {"model_cfg", "preprocess_cfg"} as on the Hugging Face hub
      mbdc.safetensors              mbdc_image.* and mbdc_text.* weights (second-order heads)
      dalip.json                    architecture name, MBDC options, source checkpoint

Loading it with plain open_clip:

    import open_clip
    open_clip.add_model_config("out/<arch>.json")  # only for archs open_clip does not know (dalip-tiny)
    model, _, preprocess = open_clip.create_model_and_transforms("<arch>", pretrained="out/open_clip_model.safetensors")

The first-order embeddings of that model equal the DALIP model's z1.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import safetensors.torch
import torch

from dalip.errors import DalipError

BASE_FILE = "open_clip_model.safetensors"
MBDC_FILE = "mbdc.safetensors"


def _tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage, and open_clip needs every key present.
    return {prefix + k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write the export directory; returns the paths written by role."""
    from dalip.evaluate import load_for_eval

    model, _, _, meta = load_for_eval(checkpoint, "cpu")
    arch = meta["model"].replace("/", "-")
    arch = Path(arch).stem if arch.endswith(".json") else arch
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise DalipError(f"model config {arch!r} is not registered with open_clip; cannot export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "base": out / BASE_FILE,
        "config": out / f"{arch}.json",
        "hf_config": out / "open_clip_config.json",
        "mbdc": out / MBDC_FILE,
        "info": out / "dalip.json",
    }
    safetensors.torch.save_file(_tensors(model.base), str(paths["base"]))
    mbdc = {**_tensors(model.mbdc_image, "mbdc_image."), **_tensors(model.mbdc_text, "mbdc_text.")}
    safetensors.torch.save_file(mbdc, str(paths["mbdc"]))
    paths["config"].write_text(json.dumps(model_cfg, indent=1))
    visual = model.base.visual
    preprocess_cfg = {
        "size": list(visual.image_size) if isinstance(visual.image_size, tuple) else visual.image_size,
        "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
    }
    paths["hf_config"].write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=1))
    info = {
        "arch": arch,
        "mbdc": meta.get("mbdc") or {},
        "source_checkpoint": meta["path"],
        "step": meta.get("step"),
        "loss": meta.get("loss"),
        "usage": f'open_clip.add_model_config("{paths["config"].name}"); '
        f'open_clip.create_model_and_transforms("{arch}", pretrained="{BASE_FILE}")',
    }
    paths["info"].write_text(json.dumps(info, indent=1))
    return paths
