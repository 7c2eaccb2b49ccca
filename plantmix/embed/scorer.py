"""The scorer model: parse a recipe's `scorer.model`, register custom architectures, encode in process.

Three spellings (DESIGN §6), all ending in one open_clip (architecture, weights) pair, which is also the
name clip-retrieval's loader takes (`open_clip:ARCH/WEIGHTS`, WEIGHTS an absolute path or a tag):
- `open_clip:ViT-B-32/laion2b_s34b_b79k`: a pretrained tag, weights from the user's cache;
- `open_clip:ARCH//abs/path/weights.safetensors`: a local checkpoint; an `ARCH.json` model config
  beside the weights is registered with open_clip when ARCH is not a stock architecture;
- a `dalip export` directory (dalip.json names the architecture; its config JSON lies beside).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import ScorerConfig

EXPORT_INFO = "dalip.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"
PREFIX = "open_clip:"


@dataclass(frozen=True)
class ScorerSpec:
    arch: str
    weights: str  # a pretrained tag, or an absolute path
    config: Path | None  # model config JSON to register (custom architectures), else None

    @property
    def is_local(self) -> bool:
        return Path(self.weights).is_absolute()

    @property
    def clip_retrieval_model(self) -> str:
        """The model name clip-retrieval's inference and back end take (all_clip's `open_clip:` loader)."""
        return f"{PREFIX}{self.arch}/{self.weights}"

    def fingerprint(self) -> dict:
        """What identifies the model's outputs: names, and the local weights' and config's content."""
        # A local checkpoint is known by its content, not where it lies: a moved build or model keeps its fingerprint.
        out = {"arch": self.arch, "weights": Path(self.weights).name if self.is_local else self.weights}
        for key, path in (("weights_sha256", Path(self.weights) if self.is_local else None), ("config_sha256", self.config)):
            if path is not None:
                out[key] = _sha256(path)
        return out


def parse_model(model: str, base_dir: Path | None = None) -> ScorerSpec:
    """A recipe's `scorer.model` as a ScorerSpec; one clear error when it names nothing loadable."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if model.startswith(PREFIX):
        arch, sep, weights = model[len(PREFIX):].partition("/")
        if not arch or not sep or not weights:
            raise PlantmixError(f"scorer.model {model!r}: expected open_clip:ARCH/PRETRAINED_TAG or open_clip:ARCH//abs/path/weights")
        if weights.startswith("/") or weights.startswith("."):
            path = Path(weights) if weights.startswith("/") else (base / weights)
            path = path.resolve()
            if not path.is_file():
                raise PlantmixError(f"scorer.model {model!r}: weights file not found: {path}")
            config = path.parent / f"{arch}.json"
            return ScorerSpec(arch, str(path), config if config.is_file() else None)
        return ScorerSpec(arch, weights, None)
    folder = (base / model).resolve()
    if folder.is_dir():
        return _export_spec(folder, model)
    raise PlantmixError(
        f"scorer.model {model!r}: not an open_clip tag (open_clip:ARCH/TAG), a checkpoint (open_clip:ARCH//path) "
        f"or a dalip export directory ({folder} does not exist)"
    )


def _export_spec(folder: Path, model: str) -> ScorerSpec:
    info_path = folder / EXPORT_INFO
    if not info_path.is_file():
        raise PlantmixError(f"scorer.model {model!r}: {folder} has no {EXPORT_INFO}; is it a `dalip export` directory?")
    try:
        arch = json.loads(info_path.read_text())["arch"]
    except (ValueError, KeyError) as e:
        raise PlantmixError(f"scorer.model {model!r}: unreadable {info_path}: {e}") from None
    weights, config = folder / EXPORT_WEIGHTS, folder / f"{arch}.json"
    for p in (weights, config):
        if not p.is_file():
            raise PlantmixError(f"scorer.model {model!r}: export directory lacks {p.name}")
    return ScorerSpec(arch, str(weights), config)


def register(spec: ScorerSpec) -> None:
    """Make open_clip know a custom architecture (no-op for stock ones); call in every loading process."""
    if spec.config is None:
        return
    import open_clip

    if open_clip.get_model_config(spec.arch) is None:
        open_clip.add_model_config(str(spec.config))


class Scorer:
    """An open_clip model in evaluation mode with its preprocessing and tokenizer."""

    def __init__(self, spec: ScorerSpec, cfg: ScorerConfig):
        import open_clip
        import torch

        register(spec)
        self.spec, self.cfg = spec, cfg
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise PlantmixError("scorer.device is cuda but no CUDA device is available")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=spec.weights, device=cfg.device)
        except Exception as e:  # noqa: BLE001 — open_clip raises many kinds; the user needs one line
            raise PlantmixError(f"scorer.model: cannot load {spec.arch} with weights {spec.weights}: {type(e).__name__}: {e}") from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(spec.arch)

    def _autocast(self):
        import contextlib

        import torch

        if self.cfg.device == "cpu" or self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if self.cfg.precision == "fp16" else torch.bfloat16)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings, (len(texts), d)."""
        bs = self.cfg.batch_size
        return _normalised([self.encode_tokens(self.tokenizer(list(texts[i : i + bs]))) for i in range(0, len(texts), bs)])

    def encode_images(self, images: list) -> np.ndarray:
        """L2-normalised float32 image embeddings of PIL images, (len(images), d)."""
        import torch

        bs = self.cfg.batch_size
        return _normalised([
            self.encode_pixels(torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + bs]]))
            for i in range(0, len(images), bs)
        ])  # fmt: skip

    def encode_pixels(self, batch) -> np.ndarray:
        """Raw float32 image features of a preprocessed batch (a (n, 3, H, W) tensor); not normalised."""
        import torch

        with torch.no_grad(), self._autocast():
            return self.model.encode_image(batch.to(self.cfg.device)).float().cpu().numpy()

    def encode_tokens(self, tokens) -> np.ndarray:
        """Raw float32 text features of a tokenised batch; not normalised."""
        import torch

        with torch.no_grad(), self._autocast():
            return self.model.encode_text(tokens.to(self.cfg.device)).float().cpu().numpy()


def _normalised(parts: list[np.ndarray]) -> np.ndarray:
    from plantmix.embed.store import normalise

    return normalise(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)


@functools.lru_cache(maxsize=4)
def load_scorer(cfg: ScorerConfig, base_dir: Path | None = None) -> Scorer:
    """The scorer of a recipe, loaded once per process and configuration."""
    return Scorer(parse_model(cfg.model, base_dir), cfg)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
