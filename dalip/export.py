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

from dalip.atomic import atomic_path, check_output_dir
from dalip.encoders import DALIP_EXPORT_FILE as INFO_FILE, MBDC_EXPORT_FILE as MBDC_FILE, WEIGHT_FILES
from dalip.errors import DalipError

BASE_FILE = WEIGHT_FILES[0]


def _tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage, and open_clip needs every key present.
    return {prefix + k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def check_export_dir(out: Path) -> None:
    """An export goes to a new or empty directory, or replaces an earlier export as a whole (never
    mixing its files with someone else's)."""
    check_output_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise DalipError(f"--out {out}: not empty and not an earlier dalip export; give a new or empty directory")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write the export directory atomically (an earlier export there is replaced as a whole);
    returns the paths written by role."""
    from dalip.evaluate import load_for_eval

    out = Path(out_dir)
    check_export_dir(out)
    model, _, _, meta = load_for_eval(checkpoint, "cpu")
    # a JSON config file registers under its stem; a registry name may spell "/" for "-"
    arch = Path(meta["model"]).stem if meta["model"].endswith(".json") else meta["model"].replace("/", "-")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise DalipError(f"model config {arch!r} is not registered with open_clip; cannot export")
    names = {"base": BASE_FILE, "config": f"{arch}.json", "hf_config": "open_clip_config.json", "mbdc": MBDC_FILE, "info": INFO_FILE}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        _write_export(tmp, {role: tmp / name for role, name in names.items()}, model, model_cfg, arch, meta)
    return {role: out / name for role, name in names.items()}


def _write_export(tmp: Path, paths: dict[str, Path], model: torch.nn.Module, model_cfg: dict, arch: str, meta: dict) -> None:
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
        "train_data": meta.get("train_data"),
        "usage": f'open_clip.add_model_config("{paths["config"].name}"); '
        f'open_clip.create_model_and_transforms("{arch}", pretrained="{BASE_FILE}")',
    }
    paths["info"].write_text(json.dumps(info, indent=1))
