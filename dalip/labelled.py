"""Labelled image sets for evaluation and few-shot adaptation, in the layouts users have:

* `imagefolder`: one subfolder per class; an optional `classnames.json` inside maps folder → names
  (`{"folder": "name"}`, `{"folder": ["name", "synonym"]}`, `{"folder": {"scientific": .., "common": ..}}`,
  or a list of names in sorted folder order); without it the folder name (underscores → spaces);
* `shards`: webdataset shards whose samples carry the class in a field (`taxon_species`, `cls`, ...);
* `clip_benchmark`: CLIP_benchmark's webdataset layout — `classnames.txt` (one name per line, line i =
  class i), `zeroshot_classification_templates.txt` (one template per line, `{c}` = the name) and
  `<split>/*.tar` with `.cls` (class index) and an image per sample;
* `csv`: a table with columns `path` (relative to the csv's folder, or absolute) and `label`;
  names from an optional classnames JSON keyed by label.

Embedding a set gives every image's first- (and second-) order embedding, its class and the sha256
of its bytes (so splits can be checked by content), plus a content fingerprint of the whole set.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch.utils.data import DataLoader, Dataset

from dalip.data import EvalShards, expand_shards, parse_caption_field
from dalip.encoders import Encoder, fingerprint_of
from dalip.config import Name, StrictConfig
from dalip.errors import DalipError
from dalip.templates import default_templates, get_templates

log = logging.getLogger(__name__)

KINDS = ("imagefolder", "shards", "clip_benchmark", "csv")
CLIP_BENCHMARK_CLASSNAMES = "classnames.txt"
CLIP_BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetSpec(StrictConfig):
    name: Name  # names output files (confusion_<name>.png)
    path: str = Field(..., description="ImageFolder or CLIP_benchmark directory, shard spec, or csv file")
    kind: Optional[Literal["imagefolder", "shards", "clip_benchmark", "csv"]] = None  # default: guessed
    domain: Literal["plant", "general"] = "plant"
    classnames: Optional[str] = Field(None, description="JSON: {class: name | [names] | {scientific, common}} or [names]")
    name_keys: Optional[str] = Field(None, description="keys of dict classnames to use, comma-separated [all]")
    class_field: str = Field("taxon_species", description="shards: field holding the class")
    templates: Optional[str] = Field(None, description="template set(s), e.g. plant+simple [the dataset's, else by domain]")
    split: str = Field("test", description="clip_benchmark: the split subfolder")


# ---------------------------------------------------------------------------------------------------
# Class names


def load_classnames(path: Path, folders: list[str], name_keys: Optional[str] = None) -> list[list[str]]:
    """Names per class (in `folders` order) from a JSON mapping; several names per class ensemble."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DalipError(f"{path}: cannot read class names ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("classes"), (list, dict)):
        data = data["classes"]
    if isinstance(data, list):
        if data and isinstance(data[0], dict) and ("folder" in data[0] or "id" in data[0]):
            data = {str(d.get("folder", d.get("id"))): d for d in data}
        elif len(data) != len(folders):
            raise DalipError(f"{path}: {len(data)} names for {len(folders)} classes")
        else:
            data = dict(zip(folders, data))
    keys = [k.strip() for k in name_keys.split(",")] if name_keys else None
    out = []
    for folder in folders:
        if folder not in data:
            raise DalipError(f"{path}: no name for class {folder!r}")
        entry = data[folder]
        if isinstance(entry, str):
            names = [entry]
        elif isinstance(entry, list):
            names = [str(n) for n in entry if n]
        elif isinstance(entry, dict):
            wanted = keys or [k for k, v in entry.items() if isinstance(v, str) and k not in ("folder", "id")]
            names = [str(entry[k]) for k in wanted if entry.get(k)]
        else:
            names = []
        if not names:
            raise DalipError(f"{path}: class {folder!r} has no usable name (keys {keys or 'any'})")
        out.append(list(dict.fromkeys(names)))
    return out


# ---------------------------------------------------------------------------------------------------
# Layouts


class FileImages(Dataset):
    """(image tensor, class value, sha256 of the file's bytes) for a list of (path, class value)."""

    def __init__(self, items: list[tuple[str, str]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        path, value = self.items[i]
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - eval data must be complete: name the file
            raise DalipError(f"{path}: cannot decode image ({e})") from None
        return self.transform(image), value, hashlib.sha256(data).hexdigest()


@dataclass
class Layout:
    """A dataset opened for reading: images with class values, the classes (None: the values seen)."""

    dataset: Dataset
    classes: Optional[list[str]]
    classnames: Optional[list[list[str]]]  # None: from spec.classnames or the class values
    templates: Optional[tuple[str, ...]]  # the dataset's own templates (CLIP_benchmark)
    templates_name: Optional[str] = None


def guess_kind(path: str) -> str:
    p = Path(path)
    if p.suffix == ".csv" and p.is_file():
        return "csv"
    if p.is_dir() and (p / CLIP_BENCHMARK_CLASSNAMES).is_file():
        return "clip_benchmark"
    if p.is_dir() and any(c.is_dir() and c.name != "shards" for c in p.iterdir()) and not list(p.glob("*.tar")):
        return "imagefolder"
    return "shards"


def _imagefolder(spec: DatasetSpec, transform) -> Layout:
    root = Path(spec.path)
    if not root.is_dir():
        raise DalipError(f"dataset {spec.name}: not a directory: {root}")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    items = [
        (str(f), folder)
        for folder in folders
        for f in sorted((root / folder).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    names_file = spec.classnames or (str(root / "classnames.json") if (root / "classnames.json").is_file() else None)
    classnames = load_classnames(Path(names_file), folders, spec.name_keys) if names_file else [[f.replace("_", " ")] for f in folders]
    return Layout(FileImages(items, transform), folders, classnames, None)


def _csv(spec: DatasetSpec, transform) -> Layout:
    path = Path(spec.path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DalipError(f"dataset {spec.name}: cannot read {path} ({e})") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DalipError(f"{path}: needs a header with columns path and label (got {sorted(rows[0]) if rows else 'no rows'})")
    items = [(str(Path(r["path"]) if Path(r["path"]).is_absolute() else path.parent / r["path"]), r["label"].strip()) for r in rows]
    classes = sorted({label for _, label in items})
    classnames = load_classnames(Path(spec.classnames), classes, spec.name_keys) if spec.classnames else None
    return Layout(FileImages(items, transform), classes, classnames, None)


def _clip_benchmark(spec: DatasetSpec, transform) -> Layout:
    root = Path(spec.path)
    names = [line.strip() for line in (root / CLIP_BENCHMARK_CLASSNAMES).read_text().splitlines() if line.strip()]
    split = root / spec.split
    if not split.is_dir():
        raise DalipError(f"dataset {spec.name}: no split folder {split} (set split=...)")
    urls = [u for source in expand_shards(str(split)) for u in source]
    templates_file = root / CLIP_BENCHMARK_TEMPLATES
    templates = None
    if templates_file.is_file() and not spec.templates:
        templates = tuple(t.strip().replace("{c}", "{}") for t in templates_file.read_text().splitlines() if t.strip())
    return Layout(EvalShards(urls, transform, ("cls",)), [str(i) for i in range(len(names))], [[n] for n in names], templates,
                  CLIP_BENCHMARK_TEMPLATES if templates else None)  # fmt: skip


def _shards(spec: DatasetSpec, transform) -> Layout:
    urls = [u for source in expand_shards(spec.path) for u in source]
    return Layout(EvalShards(urls, transform, parse_caption_field(spec.class_field)), None, None, None)


def open_layout(spec: DatasetSpec, transform) -> Layout:
    kind = spec.kind or guess_kind(spec.path)
    return {"imagefolder": _imagefolder, "csv": _csv, "clip_benchmark": _clip_benchmark, "shards": _shards}[kind](spec, transform)


# ---------------------------------------------------------------------------------------------------
# Embedding


@dataclass
class Embedded:
    """A labelled set's image embeddings in reading order, with what identifies its content."""

    name: str
    domain: str
    z1: torch.Tensor
    z2: Optional[torch.Tensor]
    labels: torch.Tensor
    sha256: list[str]
    classes: list[str]
    classnames: list[list[str]]
    templates: tuple[str, ...]
    templates_name: str
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@torch.no_grad()
def image_embeddings(encoder: Encoder, loader, device, source: str = "the data") -> tuple[torch.Tensor, Optional[torch.Tensor], list, list]:
    """(Z1, Z2 or None, targets, sha256s) over a loader of (images, targets[, sha256s]); `source`
    names the data in the error when there is none."""
    z1s, z2s, targets, hashes = [], [], [], []
    for batch in loader:
        images, target = batch[0], batch[1]
        z1, z2 = encoder.encode_image(images.to(device))
        z1s.append(z1.float().cpu())
        if z2 is not None:
            z2s.append(z2.float().cpu())
        targets += target.tolist() if torch.is_tensor(target) else list(target)
        hashes += list(batch[2]) if len(batch) > 2 else []
    if not z1s:
        raise DalipError(f"{source}: no images to evaluate")
    return torch.cat(z1s), (torch.cat(z2s) if z2s else None), targets, hashes


@torch.no_grad()
def class_embeddings(encoder: Encoder, classnames: list[list[str]], templates, device, batch_size: int = 256):
    """(W1, W2 or None), each (classes, E): normalised mean over templates × names."""
    texts, owner = [], []
    for c, names in enumerate(classnames):
        for name in names:
            for t in templates:
                texts.append(t.format(name))
                owner.append(c)
    owner_t = torch.tensor(owner, device=device)
    sums: list[Optional[torch.Tensor]] = [None, None]
    for i in range(0, len(texts), batch_size):
        for j, z in enumerate(encoder.encode_text(encoder.tokenizer(texts[i : i + batch_size]).to(device))):
            if z is None:
                continue
            if sums[j] is None:
                sums[j] = torch.zeros(len(classnames), z.shape[1], device=device)
            sums[j].index_add_(0, owner_t[i : i + batch_size], z.float())
    return tuple(None if s is None else F.normalize(s, dim=-1).cpu() for s in sums)


def embed_labelled(encoder: Encoder, spec: DatasetSpec, device, batch_size: int = 64, workers: int = 0) -> Embedded:
    """Embed every image of a labelled set once (no augmentation: the encoder's eval transform)."""
    layout = open_layout(spec, encoder.preprocess)
    loader = DataLoader(layout.dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    z1, z2, values, hashes = image_embeddings(encoder, loader, device, f"dataset {spec.name} ({spec.path})")
    values = [str(v) for v in values]
    classes = layout.classes or sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DalipError(f"dataset {spec.name}: labels without a class: {unknown[:5]}")
    classnames = layout.classnames
    if classnames is None:
        classnames = load_classnames(Path(spec.classnames), classes, spec.name_keys) if spec.classnames else [[c] for c in classes]
    if spec.templates:
        templates, templates_name = get_templates(spec.templates), spec.templates
    elif layout.templates:
        templates, templates_name = layout.templates, layout.templates_name
    else:
        templates_name = default_templates(spec.domain)
        templates = get_templates(templates_name)
    labels = torch.tensor([index[v] for v in values], dtype=torch.long)
    fingerprint = fingerprint_of(sorted(f"{h}:{v}" for h, v in zip(hashes, values)) + [json.dumps(classnames)])
    return Embedded(spec.name, spec.domain, z1, z2, labels, hashes, classes, classnames, templates, templates_name, fingerprint)


def describe(embedded: Embedded) -> dict[str, Any]:
    """The JSON-able identity of an embedded set (what results files record)."""
    return {
        "name": embedded.name, "domain": embedded.domain, "num_samples": len(embedded.labels),
        "num_classes": embedded.num_classes, "templates": embedded.templates_name, "fingerprint": embedded.fingerprint,
    }  # fmt: skip
