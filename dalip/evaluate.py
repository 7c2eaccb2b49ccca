"""Zero-shot classification and image↔text retrieval, scored with first-order, second-order and
combined similarity (combined = α·s1 + (1−α)·s2), plus the paper-style markdown table.

Datasets are ImageFolder directories (class = subfolder; optional classnames JSON) or webdataset shards
whose samples carry the class in a field (a `.json` key such as `taxon_species`, or a member such as
`cls`). Retrieval runs on held-out shards, pairing each image with its caption.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.utils.data import DataLoader

from dalip.data import EvalShards, expand_shards, parse_caption_field
from dalip.errors import DalipError
from dalip.templates import default_templates, get_templates
from dalip.validation import LOSS_BATCH_SIZE, ValidationSpec, validation_losses, validation_markdown

log = logging.getLogger(__name__)

SCORES = ("first", "second", "combined")
SCORE_LABELS = {"first": "first-order", "second": "second-order", "combined": "combined"}
RECALL_AT = (1, 5, 10)


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str = Field(..., description="ImageFolder directory or shard spec")
    kind: Optional[Literal["imagefolder", "shards"]] = None  # default: guessed from path
    domain: Literal["plant", "general"] = "plant"
    classnames: Optional[str] = Field(None, description="JSON: {folder: name | {scientific, common}} or [names]")
    name_keys: Optional[str] = Field(None, description="keys of dict classnames to use, comma-separated [all]")
    class_field: str = Field("taxon_species", description="shards: field holding the class")
    templates: Optional[str] = Field(None, description="template set(s), e.g. plant+simple [by domain]")


class RetrievalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shards: str
    caption_field: str = "txt"
    domain: Literal["plant", "general"] = "plant"


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[DatasetSpec] = Field(default_factory=list)
    retrieval: list[RetrievalSpec] = Field(default_factory=list)
    validation: list[ValidationSpec] = Field(default_factory=list)  # per-domain held-out loss
    loss_batch_size: int = Field(LOSS_BATCH_SIZE, ge=2, description="pairs per fixed validation-loss batch")
    alpha: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0)
    device: str = "auto"


def parse_spec(text: str, model: type[BaseModel]) -> BaseModel:
    """`key=value,key=value` (a bare value is the path) into a DatasetSpec or RetrievalSpec."""
    values: dict[str, str] = {}
    for item in (p for p in text.split(",") if p):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = ("path" if model is DatasetSpec else "shards"), item
        values[key.strip()] = value.strip()
    where = values.get("path") or values.get("shards") or ""
    path = Path(where.split("{")[0].rstrip("/"))
    values.setdefault("name", (path.parent.name if path.name == "shards" else path.name) or "data")
    try:
        return model(**values)
    except ValidationError as e:
        first = e.errors()[0]
        raise DalipError(f"--{'dataset' if model is DatasetSpec else 'retrieval' if model is RetrievalSpec else 'validation'} {text!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


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
# Embeddings and scores


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: list[list[str]], templates, device, batch_size: int = 256):
    """(W1, W2), each (classes, E): normalised mean over templates × names, first and second order."""
    texts, owner = [], []
    for c, names in enumerate(classnames):
        for name in names:
            for t in templates:
                texts.append(t.format(name))
                owner.append(c)
    owner_t = torch.tensor(owner, device=device)
    sums = None
    for i in range(0, len(texts), batch_size):
        z1, z2 = model.encode_text(tokenizer(texts[i : i + batch_size]).to(device), normalize=True)
        if sums is None:
            sums = [torch.zeros(len(classnames), z.shape[1], device=device) for z in (z1, z2)]
        for s, z in zip(sums, (z1, z2)):
            s.index_add_(0, owner_t[i : i + batch_size], z.float())
    return tuple(F.normalize(s, dim=-1) for s in sums)


@torch.no_grad()
def image_embeddings(model, loader, device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(Z1, Z2, targets) over a loader of (images, targets)."""
    z1s, z2s, targets = [], [], []
    for images, target in loader:
        z1, z2 = model.encode_image(images.to(device), normalize=True)
        z1s.append(z1.float().cpu())
        z2s.append(z2.float().cpu())
        targets += target.tolist() if torch.is_tensor(target) else list(target)
    if not z1s:
        raise DalipError("no images to evaluate")
    return torch.cat(z1s), torch.cat(z2s), targets


def similarities(a1, a2, b1, b2, alpha: float) -> dict[str, torch.Tensor]:
    s1, s2 = a1 @ b1.T, a2 @ b2.T
    return {"first": s1, "second": s2, "combined": alpha * s1 + (1 - alpha) * s2}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = ranked == labels[:, None]
    return {f"top{k}": float(hit[:, :k].any(dim=1).float().mean()) for k in ks}


def recall_at(scores: torch.Tensor, ks=RECALL_AT) -> dict[str, float]:
    """Row i's correct column is i."""
    correct = scores.diagonal()[:, None]
    rank = (scores > correct).sum(dim=1)  # ties count in the model's favour
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


# ---------------------------------------------------------------------------------------------------
# Datasets


def _loader(dataset, cfg: EvalConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=False)


def _strict_loader(path: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - eval data must be complete: name the file
        raise DalipError(f"{path}: cannot decode image ({e})") from None


def _guess_kind(path: str) -> str:
    p = Path(path)
    if p.is_dir() and any(c.is_dir() and c.name != "shards" for c in p.iterdir()) and not list(p.glob("*.tar")):
        return "imagefolder"
    return "shards"


def zero_shot(model, preprocess, tokenizer, spec: DatasetSpec, cfg: EvalConfig, device) -> dict[str, Any]:
    kind = spec.kind or _guess_kind(spec.path)
    if kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        if not Path(spec.path).is_dir():
            raise DalipError(f"dataset {spec.name}: not a directory: {spec.path}")
        dataset = ImageFolder(spec.path, transform=preprocess, loader=_strict_loader)
        folders = dataset.classes
        names_file = spec.classnames or (str(Path(spec.path) / "classnames.json") if (Path(spec.path) / "classnames.json").is_file() else None)
        classnames = load_classnames(Path(names_file), folders, spec.name_keys) if names_file else [[f.replace("_", " ")] for f in folders]
        z1, z2, labels = image_embeddings(model, _loader(dataset, cfg), device)
    else:
        urls = [u for source in expand_shards(spec.path) for u in source]
        dataset = EvalShards(urls, preprocess, parse_caption_field(spec.class_field))
        z1, z2, values = image_embeddings(model, _loader(dataset, cfg), device)
        folders = sorted(set(values))
        if spec.classnames:
            classnames = load_classnames(Path(spec.classnames), folders, spec.name_keys)
        else:
            classnames = [[v] for v in folders]
        index = {f: i for i, f in enumerate(folders)}
        labels = [index[v] for v in values]
    templates_name = spec.templates or default_templates(spec.domain)
    w1, w2 = class_embeddings(model, tokenizer, classnames, get_templates(templates_name), device)
    labels_t = torch.tensor(labels)
    scores = similarities(z1, z2, w1.cpu(), w2.cpu(), cfg.alpha)
    result = {"domain": spec.domain, "num_samples": len(labels), "num_classes": len(classnames), "templates": templates_name}
    result.update({kind_: topk_accuracy(s, labels_t) for kind_, s in scores.items()})
    return result


@torch.no_grad()
def retrieval(model, preprocess, tokenizer, spec: RetrievalSpec, cfg: EvalConfig, device) -> dict[str, Any]:
    urls = [u for source in expand_shards(spec.shards) for u in source]
    dataset = EvalShards(urls, preprocess, parse_caption_field(spec.caption_field))
    i1, i2, captions = image_embeddings(model, _loader(dataset, cfg), device)
    t1s, t2s = [], []
    for i in range(0, len(captions), cfg.batch_size):
        z1, z2 = model.encode_text(tokenizer(captions[i : i + cfg.batch_size]).to(device), normalize=True)
        t1s.append(z1.float().cpu())
        t2s.append(z2.float().cpu())
    t1, t2 = torch.cat(t1s), torch.cat(t2s)
    result: dict[str, Any] = {"domain": spec.domain, "num_pairs": len(captions)}
    for kind, s in similarities(i1, i2, t1, t2, cfg.alpha).items():
        result[kind] = {"image_to_text": recall_at(s), "text_to_image": recall_at(s.T)}
    return result


# ---------------------------------------------------------------------------------------------------
# Driver and report


def load_for_eval(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, preprocess_val, tokenizer, meta) from a checkpoint or run directory."""
    from dalip.checkpoint import load_meta, load_model_weights, resolve_checkpoint
    from dalip.model import create_model

    path = resolve_checkpoint(checkpoint)
    meta = load_meta(path)
    model, _, preprocess, tokenizer = create_model(
        meta["model"], mbdc=meta.get("mbdc") or None, device=device, model_config_path=meta.get("model_config_path")
    )
    load_model_weights(model, path)
    model.eval()
    return model, preprocess, tokenizer, {**meta, "path": str(path)}


def means(zero_shot_results: dict[str, dict[str, Any]], metric: str = "top1") -> dict[str, dict[str, float]]:
    """Per score kind: general mean, plant mean, mean over all datasets (NaN where none)."""
    out = {}
    for kind in SCORES:
        values = {d: r[kind][metric] for d, r in zero_shot_results.items()}
        by = {dom: [v for d, v in values.items() if zero_shot_results[d]["domain"] == dom] for dom in ("general", "plant")}
        avg = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        out[kind] = {"general": avg(by["general"]), "plant": avg(by["plant"]), "all": avg(list(values.values()))}
    return out


def evaluate(checkpoint: str | Path, cfg: EvalConfig, label: Optional[str] = None) -> dict[str, Any]:
    """Run every configured dataset; returns the JSON-able results."""
    if not cfg.datasets and not cfg.retrieval and not cfg.validation:
        raise DalipError("nothing to evaluate: give at least one dataset, retrieval or validation set")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, preprocess, tokenizer, meta = load_for_eval(checkpoint, device)
    results: dict[str, Any] = {
        "label": label or meta.get("config", {}).get("name") or Path(meta["path"]).parent.parent.name,
        "checkpoint": meta["path"],
        "step": meta.get("step"),
        "model": meta["model"],
        "loss": meta.get("loss"),
        "alpha": cfg.alpha,
        "zero_shot": {},
        "retrieval": {},
    }
    for spec in cfg.datasets:
        log.info("zero-shot: %s", spec.name)
        results["zero_shot"][spec.name] = zero_shot(model, preprocess, tokenizer, spec, cfg, device)
    for spec in cfg.retrieval:
        log.info("retrieval: %s", spec.name)
        results["retrieval"][spec.name] = retrieval(model, preprocess, tokenizer, spec, cfg, device)
    results["validation"] = validation_losses(model, preprocess, tokenizer, cfg.validation, cfg, device)
    if results["zero_shot"]:
        results["means"] = means(results["zero_shot"])
    return results


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown_table(all_results: list[dict[str, Any]], kinds=SCORES) -> str:
    """Zero-shot top-1 (%) like the paper: datasets (general first, then plant) + three means."""
    names: dict[str, str] = {}
    for r in all_results:
        for d, z in r["zero_shot"].items():
            names.setdefault(d, z["domain"])
    ordered = [d for d in names if names[d] == "general"] + [d for d in names if names[d] == "plant"]
    head = ["Model", *[f"{d} ({names[d]})" for d in ordered], "General mean", "Plant mean", "Mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in all_results:
        m = means(r["zero_shot"]) if r["zero_shot"] else {}
        for kind in kinds:
            cells = [_pct(r["zero_shot"][d][kind]["top1"]) if d in r["zero_shot"] else "–" for d in ordered]
            mk = m.get(kind, {})
            cells += [_pct(mk.get("general")), _pct(mk.get("plant")), _pct(mk.get("all"))]
            lines.append(f"| {r['label']} ({SCORE_LABELS[kind]}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    retrieval_rows = [
        f"| {r['label']} ({SCORE_LABELS[kind]}) | {d} | "
        + " | ".join(_pct(x[kind][direction][f"R@{k}"]) for direction in ("image_to_text", "text_to_image") for k in RECALL_AT)
        + " |"
        for r in all_results for d, x in r["retrieval"].items() for kind in kinds
    ]  # fmt: skip
    if retrieval_rows:
        head = "| Model | Dataset | I→T R@1 | I→T R@5 | I→T R@10 | T→I R@1 | T→I R@5 | T→I R@10 |"
        table += "\n\n" + head + "\n|---|---|" + "---:|" * 6 + "\n" + "\n".join(retrieval_rows)
    return table + "\n"


def _finite_or_null(x: Any) -> Any:
    """NaN (a mean over no dataset) becomes null: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_null(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """results.json and results.md in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(_finite_or_null(results), indent=1))
    md_path.write_text(markdown_table([results]) + validation_markdown(results))
    return json_path, md_path
