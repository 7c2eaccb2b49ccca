"""DALIP model: an open_clip CLIP model plus one MBDC module per tower (DESIGN §2.2).

The tower forwards are re-run from open_clip's public submodules (conv1, class_embedding, ...,
ln_post, proj; token_embedding, ..., ln_final, text_projection) so that we get every token in the
joint embedding space without forking or patching open_clip; the first-order embeddings follow
open_clip's own pooling rules and equal its encode_image / encode_text exactly (tests check this).
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

from safetensors import SafetensorError

from dalip import DalipError
from dalip.config import MBDCOptions
from dalip.errors import first_line
from dalip.mbdc import MBDC

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

MBDC_OPTIONS = tuple(MBDCOptions.model_fields)
PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _unsupported(what: str, detail: str) -> NotImplementedError:
    return NotImplementedError(f"dalip supports open_clip ViT towers only; {what} is {detail}")


def _check_vision(visual: nn.Module) -> None:
    if not isinstance(visual, VisionTransformer):
        raise _unsupported("the vision tower", type(visual).__name__)
    if getattr(visual, "attn_pool", None) is not None:
        raise _unsupported("the vision tower", "a VisionTransformer with an attentional pooler")
    if visual.pool_type not in ("tok", "avg"):
        raise _unsupported("the vision tower", f"a VisionTransformer with pool_type={visual.pool_type!r}")
    if visual.proj is None:
        raise _unsupported("the vision tower", "a VisionTransformer without output projection")


class _TextParts:
    """The text tower's pieces, wherever the open_clip class keeps them (CLIP vs CustomTextCLIP)."""

    def __init__(self, base: nn.Module):
        owner = getattr(base, "text", None)
        if owner is None:  # CLIP keeps the text tower's parts on the model itself
            owner, pool_type, eos_id = base, base.text_pool_type, getattr(base, "text_eos_id", None)
        elif isinstance(owner, TextTransformer):
            if owner.cls_emb is not None:
                raise _unsupported("the text tower", "a TextTransformer with an appended CLS embedding (CoCa)")
            if getattr(owner, "use_pad_mask", False):
                raise _unsupported("the text tower", "a TextTransformer with a padding attention mask")
            pool_type, eos_id = owner.pool_type, getattr(owner, "eos_id", None)
        else:
            raise _unsupported("the text tower", type(owner).__name__)
        if pool_type not in ("argmax", "eos", "first", "last"):
            raise _unsupported("the text tower", f"a text tower with pool_type={pool_type!r}")
        if owner.text_projection is None:
            raise _unsupported("the text tower", "a text tower without output projection")
        self.token_embedding = owner.token_embedding
        self.positional_embedding = owner.positional_embedding
        self.transformer = owner.transformer
        self.ln_final = owner.ln_final
        self.projection = owner.text_projection
        self.owner = owner
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.pad_id = getattr(owner, "pad_id", 0)


def _embed_width(projection: nn.Module | torch.Tensor) -> int:
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]


def _project(x: torch.Tensor, projection: nn.Module | torch.Tensor) -> torch.Tensor:
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class DALIP(nn.Module):
    """Wraps an open_clip CLIP / CustomTextCLIP model (`base`) with `mbdc_image` and `mbdc_text`."""

    def __init__(self, base: nn.Module, mbdc: dict[str, Any] | None = None):
        super().__init__()
        _check_vision(base.visual)
        text = _TextParts(base)
        options = dict(mbdc or {})
        unknown = sorted(set(options) - set(MBDC_OPTIONS))
        if unknown:
            raise DalipError(f"mbdc: unknown option(s) {', '.join(unknown)}; known: {', '.join(MBDC_OPTIONS)}")
        self.base = base
        self.mbdc_image = MBDC(base.visual.proj.shape[1], **options)
        self.mbdc_text = MBDC(_embed_width(text.projection), **options)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.base.logit_scale

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.base.set_grad_checkpointing(enable)

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled first-order embedding (B, E) un-normalised, all tokens after ln_post @ proj (B, N, E))."""
        visual = self.base.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        x = visual.transformer(x)
        pool: Callable[[torch.Tensor], torch.Tensor] = (
            (lambda t: t[:, 0]) if visual.pool_type == "tok" else (lambda t: t[:, 1:].mean(dim=1)))
        if visual.final_ln_after_pool:
            pooled = visual.ln_post(pool(x))
            x = visual.ln_post(x)
        else:
            x = visual.ln_post(x)
            pooled = pool(x)
        return pooled @ visual.proj, x @ visual.proj

    def text_tokens(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled (B, E), all tokens after ln_final @ text_projection (B, L, E), anchor (B,), valid (B, L))."""
        parts = _TextParts(self.base)
        length = text.shape[1]
        cast_dtype = parts.transformer.get_cast_dtype()
        x = parts.token_embedding(text).to(cast_dtype)
        x = x + parts.positional_embedding[:length].to(cast_dtype)
        attn_mask = parts.owner.attn_mask
        x = parts.transformer(x, attn_mask=None if attn_mask is None else attn_mask[:length, :length])
        x = parts.ln_final(x)

        # The anchor is the token open_clip's text_global_pool would pick.
        positions = torch.arange(length, device=text.device)
        if parts.pool_type == "argmax":  # EOT has the largest id with the default tokenizer
            anchor = text.argmax(dim=-1)
        elif parts.pool_type == "eos":
            anchor = (text == parts.eos_id).int().argmax(dim=-1)
        elif parts.pool_type == "last":
            anchor = torch.full_like(text[:, 0], length - 1)
        else:  # "first": a leading CLS token summarises the whole unpadded sequence
            anchor = torch.zeros_like(text[:, 0])
        if parts.pool_type == "first":
            valid = (text != parts.pad_id) | (positions.unsqueeze(0) == 0)
        else:
            valid = positions.unsqueeze(0) <= anchor.unsqueeze(1)
        pooled = x[torch.arange(x.shape[0], device=x.device), anchor]
        return _project(pooled, parts.projection), _project(x, parts.projection), anchor, valid

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(z1, z2): z1 is open_clip's image embedding (L2-normalised if `normalize`), z2 is always unit norm."""
        pooled, tokens = self.image_tokens(images)
        batch, length = tokens.shape[:2]
        anchor = torch.zeros(batch, dtype=torch.long, device=tokens.device)  # CLS
        valid = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        z2 = self.mbdc_image(tokens, anchor, valid)
        return (F.normalize(pooled, dim=-1) if normalize else pooled), z2

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(z1, z2): z1 is open_clip's text embedding (L2-normalised if `normalize`), z2 is always unit norm."""
        pooled, tokens, anchor, valid = self.text_tokens(text)
        z2 = self.mbdc_text(tokens, anchor, valid)
        return (F.normalize(pooled, dim=-1) if normalize else pooled), z2

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        image_features, image_features_2 = self.encode_image(images)
        text_features, text_features_2 = self.encode_text(texts)
        return {
            "image_features": image_features,
            "text_features": text_features,
            "image_features_2": image_features_2,
            "text_features_2": text_features_2,
            "logit_scale": self.base.logit_scale.exp(),  # one scale shared by both loss terms
        }


def resolve_model_name(model_name: str, model_config_path: str | None = None) -> str:
    """Registry name for `model_name`: an open_clip name, a config in dalip/model_configs, or a JSON file.

    `model_config_path` (a JSON file or a folder of them) is registered with open_clip first.
    """
    if model_config_path is not None:
        path = Path(model_config_path)
        if not path.exists():
            raise DalipError(f"model config path not found: {path}")
        if path.is_file():
            _check_config_file(path)
        open_clip.add_model_config(path)
    if model_name.startswith("hf-hub:"):
        return model_name
    if model_name.endswith(".json") or Path(model_name).is_file():
        path = Path(model_name)
        if not path.is_file():
            raise DalipError(f"model config file not found: {path}")
        _check_config_file(path)
        open_clip.add_model_config(path)
        model_name = path.stem
    name = model_name.replace("/", "-")  # open_clip accepts "ViT-B/16" for "ViT-B-16"
    if open_clip.get_model_config(name) is None:
        raise DalipError(
            f"unknown model {model_name!r}: not an open_clip model, a config in {MODEL_CONFIG_DIR.name}/, "
            "or a JSON config file")
    return name


def _check_config_file(path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DalipError(f"{path}: cannot read model config ({err})") from None
    missing = [key for key in CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise DalipError(f"{path}: model config lacks {', '.join(missing)}")


def create_model(
    model_name: str,
    pretrained: str | None = None,
    mbdc: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    model_config_path: str | None = None,
    aug_cfg: dict[str, Any] | None = None,
) -> tuple[DALIP, Callable, Callable, Callable]:
    """Build (DALIP model, preprocess_train, preprocess_val, tokenizer).

    `pretrained` is an open_clip tag or a local checkpoint of the base model (open_clip loads it);
    the MBDC modules start from random init. They stay float32 except under pure_* precision.
    `aug_cfg` (open_clip's AugmentationCfg as a dict) shapes preprocess_train only.
    """
    if precision not in PRECISIONS:
        raise DalipError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    name = resolve_model_name(model_name, model_config_path)
    try:
        with warnings.catch_warnings():  # open_clip 2.32 names colour jitter and grey scale "unused", yet applies them
            warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
            base, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, precision=precision, device=device, aug_cfg=aug_cfg)
    except pickle.UnpicklingError:
        # torch's own text suggests weights_only=False, i.e. running the file's code: never do that
        raise DalipError(
            f"--pretrained {pretrained}: refused: the file holds pickled objects other than tensors, which could "
            "run code; give safetensors or a torch file of tensors only"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, SafetensorError) as err:
        if not pretrained:
            raise
        if "not found" in str(err):
            raise DalipError(f"pretrained weights {pretrained!r} not found for model {name}") from None
        raise DalipError(f"--pretrained {pretrained}: cannot load it into {name} ({first_line(err)})") from None
    model = DALIP(base, mbdc)
    dtype = {"pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}.get(precision, torch.float32)
    for module in (model.mbdc_image, model.mbdc_text):
        module.to(device=device, dtype=dtype)
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)
