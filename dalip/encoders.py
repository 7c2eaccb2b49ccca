"""Frozen image/text encoders for evaluation and few-shot adaptation, from whatever a user has:

* a dalip run directory or checkpoint directory (first- and second-order embeddings);
* a `dalip export` directory (`dalip.json` + `mbdc.safetensors` next to the open_clip weights: both);
* a plain open_clip export: a directory with `open_clip_config.json` (the Hugging Face hub layout:
  `model_cfg`, `preprocess_cfg`) or an `<arch>.json`, and `open_clip_model.safetensors` (or
  `open_clip_pytorch_model.bin`) — first order only, no dalip file needed;
* an open_clip architecture name, `ARCH` (random init, seeded) or `ARCH:PATH` (a local checkpoint).

Nothing is fetched from a hub. Every encoder carries a fingerprint: the sha256 of its weight files.
(Importing dalip.model registers dalip's own architectures, such as dalip-tiny, with open_clip.)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F

from dalip.errors import DalipError
from dalip.model import CONFIG_KEYS

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG_FILE = "open_clip_config.json"
DALIP_EXPORT_FILE = "dalip.json"
MBDC_EXPORT_FILE = "mbdc.safetensors"


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_of(parts: list[str]) -> str:
    """One sha256 over several strings (file hashes, names), order-sensitive."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class Encoder:
    """A frozen model in eval mode. `second_order`: it also gives MBDC (z2) embeddings."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    second_order: bool
    info: dict[str, Any] = field(default_factory=dict)  # kind, name, path, step, fingerprint, ...

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.second_order:
            return self.model.encode_image(images, normalize=True)
        return F.normalize(self.model.encode_image(images), dim=-1), None

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.second_order:
            return self.model.encode_text(tokens, normalize=True)
        return F.normalize(self.model.encode_text(tokens), dim=-1), None


def _dalip_checkpoint(path: Path, device) -> Encoder:
    from dalip.checkpoint import MODEL_FILE
    from dalip.evaluate import load_for_eval

    model, preprocess, tokenizer, meta = load_for_eval(path, device)
    info = {
        "kind": "dalip-checkpoint", "name": meta.get("config", {}).get("name") or Path(meta["path"]).parent.parent.name,
        "model": meta["model"], "path": meta["path"], "step": meta.get("step"), "loss": meta.get("loss"),
        "fingerprint": sha256_file(Path(meta["path"]) / MODEL_FILE), "train_data": meta.get("train_data"),
    }  # fmt: skip
    return Encoder(model, preprocess, tokenizer, True, info)


def _register(arch: str, model_cfg: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)


def _register_config(directory: Path) -> tuple[str, dict[str, Any]]:
    """(architecture name, preprocess options) of an export directory, its config registered."""
    hf = directory / HF_CONFIG_FILE
    if hf.is_file():
        data = json.loads(hf.read_text())
        model_cfg = data.get("model_cfg")
        if not isinstance(model_cfg, dict):
            raise DalipError(f"{hf}: no model_cfg")
        exported = directory / DALIP_EXPORT_FILE
        # The hub layout has no architecture name: a dalip export names it, else the config's hash does.
        arch = json.loads(exported.read_text())["arch"] if exported.is_file() else None
        arch = arch or f"local-{hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]}"
        if open_clip.get_model_config(arch) is None:
            _register(arch, model_cfg)
        pre = data.get("preprocess_cfg") or {}
        return arch, {k: v for k, v in (("image_mean", pre.get("mean")), ("image_std", pre.get("std"))) if v}
    for config in sorted(directory.glob("*.json")):
        data = json.loads(config.read_text()) if config.name != DALIP_EXPORT_FILE else None
        if isinstance(data, dict) and all(k in data for k in CONFIG_KEYS):
            open_clip.add_model_config(config)
            return config.stem, {}
    raise DalipError(f"{directory}: no model config ({HF_CONFIG_FILE} or <arch>.json with embed_dim, vision_cfg, text_cfg)")


def _export_dir(directory: Path, device) -> Encoder:
    weights = next((directory / w for w in WEIGHT_FILES if (directory / w).is_file()), None)
    if weights is None:
        raise DalipError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES)})")
    arch, preprocess_kw = _register_config(directory)
    base, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device, **preprocess_kw)
    tokenizer = open_clip.get_tokenizer(arch)
    hashes = [sha256_file(weights)]
    info: dict[str, Any] = {"kind": "open_clip-export", "name": directory.name, "model": arch, "path": str(directory)}
    mbdc_file = directory / MBDC_EXPORT_FILE
    if (directory / DALIP_EXPORT_FILE).is_file() and mbdc_file.is_file():
        from dalip.model import DALIP

        exported = json.loads((directory / DALIP_EXPORT_FILE).read_text())
        model = DALIP(base, exported.get("mbdc") or None).to(device)
        state = safetensors.torch.load_file(str(mbdc_file))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("mbdc_") for k in missing):
            raise DalipError(f"{mbdc_file}: does not fit the exported MBDC options {exported.get('mbdc')}")
        hashes.append(sha256_file(mbdc_file))
        info.update(kind="dalip-export", step=exported.get("step"), loss=exported.get("loss"))
        encoder = Encoder(model.eval(), preprocess, tokenizer, True, info)
    else:
        encoder = Encoder(base.eval(), preprocess, tokenizer, False, info)
    encoder.info["fingerprint"] = fingerprint_of(hashes)
    return encoder


def _open_clip_arch(spec: str, device) -> Encoder:
    arch, _, weights = spec.partition(":")
    if open_clip.get_model_config(arch) is None:
        raise DalipError(
            f"model {spec!r}: not a dalip run, checkpoint or export directory, nor an open_clip architecture "
            "(ARCH or ARCH:/path/to/checkpoint)"
        )
    if weights and not Path(weights).is_file():
        raise DalipError(f"model {spec!r}: checkpoint file not found: {weights} (hub tags are not fetched)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random-init baseline is the same model every time
        base, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights or None, device=device)
    fingerprint = sha256_file(weights) if weights else fingerprint_of(["random-init", arch, "seed 0"])
    info = {"kind": "open_clip", "name": arch, "model": arch, "path": weights or None, "fingerprint": fingerprint}
    return Encoder(base.eval(), preprocess, open_clip.get_tokenizer(arch), False, info)


def load_encoder(spec: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """An Encoder from a dalip run/checkpoint, an export directory, or an open_clip ARCH[:PATH]."""
    path = Path(spec)
    if path.is_dir():
        if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
            return _dalip_checkpoint(path, device)
        return _export_dir(path, device)
    return _open_clip_arch(str(spec), device)
