"""Zero-shot classification and image↔text retrieval, scored with first-order, second-order and
combined similarity (combined = α·s1 + (1−α)·s2), plus the paper-style markdown table.

Datasets are read by dalip.labelled (ImageFolder with classnames.json, shards with a class field,
CLIP_benchmark's webdataset layout, a csv of path,label). Retrieval runs on held-out shards, pairing each
image with its caption. Models are loaded by dalip.encoders (a dalip run, checkpoint or export, or a
plain open_clip model: then first-order scores only).

`evaluate()` runs one section per kind of evaluation, each adding one key to the results; a new kind
of evaluation is one more call there. Results are kept per checkpoint step (`step_NNNNNNNN/` in the
output directory, never overwritten; `results.json` / `.md` beside them are the latest) and record
the model's and every dataset's fingerprint and, for a dalip checkpoint, the training data it saw.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, Field, ValidationError
from torch.utils.data import DataLoader

from dalip.atomic import check_output_dir, write_text_atomic
from dalip.config import MAX_BATCH, MAX_WORKERS, Device, Name, StrictConfig
from dalip.data import EvalShards, expand_shards, parse_caption_field
from dalip.encoders import Encoder, load_encoder
from dalip.errors import DalipError
from dalip.labelled import DatasetSpec, class_embeddings, describe, embed_labelled, image_embeddings, load_classnames
from dalip.validation import LOSS_BATCH_SIZE, ValidationSpec, validation_losses, validation_markdown

__all__ = ["DatasetSpec", "EvalConfig", "RetrievalSpec", "evaluate", "load_classnames", "load_for_eval", "write_results"]

log = logging.getLogger(__name__)

SCORES = ("first", "second", "combined")
SCORE_LABELS = {"first": "first-order", "second": "second-order", "combined": "combined"}
RECALL_AT = (1, 5, 10)


class RetrievalSpec(StrictConfig):
    name: Name
    shards: str
    caption_field: str = "txt"
    domain: Literal["plant", "general"] = "plant"


class EvalConfig(StrictConfig):
    datasets: list[DatasetSpec] = Field(default_factory=list)
    retrieval: list[RetrievalSpec] = Field(default_factory=list)
    validation: list[ValidationSpec] = Field(default_factory=list)  # per-domain held-out loss
    loss_batch_size: int = Field(LOSS_BATCH_SIZE, ge=2, description="pairs per fixed validation-loss batch")
    alpha: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    workers: int = Field(0, ge=0, le=MAX_WORKERS)
    device: Device = "auto"


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
        flag = "dataset" if model is DatasetSpec else "retrieval" if model is RetrievalSpec else "validation"
        raise DalipError(f"--{flag} {text!r}: {'.'.join(map(str, first['loc']))}: {first['msg'].removeprefix('Value error, ')}") from None


# ---------------------------------------------------------------------------------------------------
# Scores


def similarities(a1, a2, b1, b2, alpha: float) -> dict[str, torch.Tensor]:
    """Scores by kind; first order only when either side has no second-order embeddings."""
    s1 = a1 @ b1.T
    if a2 is None or b2 is None:
        return {"first": s1}
    s2 = a2 @ b2.T
    return {"first": s1, "second": s2, "combined": alpha * s1 + (1 - alpha) * s2}


def main_score(scores: dict[str, torch.Tensor]) -> str:
    """The score the confusion matrix shows: combined when there is one."""
    return "combined" if "combined" in scores else "first"


def per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float | None]:
    hit = scores.argmax(dim=1) == labels
    return {c: (float(hit[labels == i].float().mean()) if (labels == i).any() else None) for i, c in enumerate(classes)}


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(true class, predicted class) counts."""
    n = scores.shape[1]
    return torch.bincount(labels * n + scores.argmax(dim=1), minlength=n * n).reshape(n, n)


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


def zero_shot(encoder: Encoder, spec: DatasetSpec, cfg: EvalConfig, device) -> dict[str, Any]:
    """Top-1 (and top-5 when there are more than 5 classes), per-class accuracy and the confusion
    matrix of the main score, the chance level and the data's fingerprint."""
    data = embed_labelled(encoder, spec, device, cfg.batch_size, cfg.workers)
    w1, w2 = class_embeddings(encoder, data.classnames, data.templates, device)
    scores = similarities(data.z1, data.z2, w1, w2, cfg.alpha)
    ks = (1, 5) if data.num_classes > 5 else (1,)
    result: dict[str, Any] = {**describe(data), "chance": 1 / data.num_classes, "classes": data.classes}
    if data.num_classes == 1:  # argmax over one class is always right: the score says nothing
        result["warning"] = f"dataset {spec.name} has one class: top-1 is 100 % by construction (chance 100 %)"
        log.warning("warning: %s", result["warning"])
    result.update({kind: topk_accuracy(s, data.labels, ks) for kind, s in scores.items()})
    result["per_class"] = {kind: per_class_accuracy(s, data.labels, data.classes) for kind, s in scores.items()}
    main = main_score(scores)
    result["confusion"] = {"score": main, "matrix": confusion_matrix(scores[main], data.labels).tolist()}
    return result


@torch.no_grad()
def retrieval(encoder: Encoder, spec: RetrievalSpec, cfg: EvalConfig, device) -> dict[str, Any]:
    urls = [u for source in expand_shards(spec.shards) for u in source]
    dataset = EvalShards(urls, encoder.preprocess, parse_caption_field(spec.caption_field))
    i1, i2, captions, _ = image_embeddings(encoder, _loader(dataset, cfg), device, f"retrieval {spec.name} ({spec.shards})")
    t1s, t2s = [], []
    for i in range(0, len(captions), cfg.batch_size):
        z1, z2 = encoder.encode_text(encoder.tokenizer(captions[i : i + cfg.batch_size]).to(device))
        t1s.append(z1.float().cpu())
        if z2 is not None:
            t2s.append(z2.float().cpu())
    t1, t2 = torch.cat(t1s), (torch.cat(t2s) if t2s else None)
    result: dict[str, Any] = {"domain": spec.domain, "num_pairs": len(captions)}
    for kind, s in similarities(i1, i2, t1, t2, cfg.alpha).items():
        result[kind] = {"image_to_text": recall_at(s), "text_to_image": recall_at(s.T)}
    return result


def _loader(dataset, cfg: EvalConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=False)


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


def score_kinds(zero_shot_results: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The score kinds every dataset has (first only for a model without second-order embeddings)."""
    return tuple(k for k in SCORES if all(k in r for r in zero_shot_results.values()))


def _avg(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def means(zero_shot_results: dict[str, dict[str, Any]], metric: str = "top1") -> dict[str, dict[str, float]]:
    """Per score kind (and `chance`): general mean, plant mean, mean over all datasets (NaN where none)."""
    out = {}
    with_chance = all("chance" in r for r in zero_shot_results.values())
    for kind in (*score_kinds(zero_shot_results), *(("chance",) if with_chance else ())):
        values = {d: (r["chance"] if kind == "chance" else r[kind][metric]) for d, r in zero_shot_results.items()}
        by = {dom: [v for d, v in values.items() if zero_shot_results[d]["domain"] == dom] for dom in ("general", "plant")}
        out[kind] = {"general": _avg(by["general"]), "plant": _avg(by["plant"]), "all": _avg(list(values.values()))}
    return out


def evaluate(checkpoint: str | Path, cfg: EvalConfig, label: Optional[str] = None) -> dict[str, Any]:
    """Run every configured dataset; returns the JSON-able results."""
    if not cfg.datasets and not cfg.retrieval and not cfg.validation:
        raise DalipError("nothing to evaluate: give at least one dataset, retrieval or validation set")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = load_encoder(checkpoint, device)
    info = encoder.info
    results: dict[str, Any] = {
        "label": label or info["name"],
        "checkpoint": info["path"],
        "step": info.get("step"),
        "model": info["model"],
        "model_kind": info["kind"],
        "model_fingerprint": info["fingerprint"],
        "train_data": info.get("train_data"),
        "loss": info.get("loss"),
        "alpha": cfg.alpha,
        "zero_shot": {},
        "retrieval": {},
    }
    for spec in cfg.datasets:
        log.info("zero-shot: %s", spec.name)
        results["zero_shot"][spec.name] = zero_shot(encoder, spec, cfg, device)
    for spec in cfg.retrieval:
        log.info("retrieval: %s", spec.name)
        results["retrieval"][spec.name] = retrieval(encoder, spec, cfg, device)
    results["validation"] = validation_losses(encoder, cfg.validation, cfg, device)
    if results["zero_shot"]:
        results["means"] = means(results["zero_shot"])
    return results


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown_table(all_results: list[dict[str, Any]], kinds=SCORES) -> str:
    """Zero-shot top-1 (%) like the paper: datasets (general first, then plant) + three means, and a
    chance row (1 / classes)."""
    names: dict[str, str] = {}
    for r in all_results:
        for d, z in r["zero_shot"].items():
            names.setdefault(d, z["domain"])
    ordered = [d for d in names if names[d] == "general"] + [d for d in names if names[d] == "plant"]
    head = ["Model", *[f"{d} ({names[d]})" for d in ordered], "General mean", "Plant mean", "Mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    chance: dict[str, float] = {}
    for r in all_results:
        m = means(r["zero_shot"]) if r["zero_shot"] else {}
        for kind in (k for k in kinds if k in m):
            cells = [_pct(r["zero_shot"][d][kind]["top1"]) if d in r["zero_shot"] else "–" for d in ordered]
            mk = m.get(kind, {})
            cells += [_pct(mk.get("general")), _pct(mk.get("plant")), _pct(mk.get("all"))]
            lines.append(f"| {r['label']} ({SCORE_LABELS[kind]}) | " + " | ".join(cells) + " |")
        chance.update({d: z["chance"] for d, z in r["zero_shot"].items() if "chance" in z})
    if ordered and all(d in chance for d in ordered):
        by = {dom: [chance[d] for d in ordered if names[d] == dom] for dom in ("general", "plant")}
        cells = [_pct(chance[d]) for d in ordered] + [_pct(_avg(by["general"])), _pct(_avg(by["plant"])), _pct(_avg(list(chance.values())))]
        lines.append("| Chance | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    retrieval_rows = [
        f"| {r['label']} ({SCORE_LABELS[kind]}) | {d} | "
        + " | ".join(_pct(x[kind][direction][f"R@{k}"]) for direction in ("image_to_text", "text_to_image") for k in RECALL_AT)
        + " |"
        for r in all_results for d, x in r["retrieval"].items() for kind in kinds if kind in x
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


def results_dir_name(results: dict[str, Any]) -> str:
    """Per-checkpoint folder: step_NNNNNNNN for a dalip step, else the model's fingerprint."""
    if results.get("step") is not None:
        return f"step_{int(results['step']):08d}"
    return f"model_{results['model_fingerprint'][:12]}"


def _fingerprint_in(folder: Path) -> str | None:
    """The model fingerprint of the results kept in `folder` (None when there are none)."""
    try:
        return json.loads((folder / "results.json").read_text()).get("model_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def plot_confusion(result: dict[str, Any], name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = torch.tensor(result["confusion"]["matrix"], dtype=torch.float)
    rows = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    classes = result["classes"]
    size = min(20, 3 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 60:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top1 = result[result["confusion"]["score"]]["top1"]
    ax.set_title(f"{name}: {SCORE_LABELS[result['confusion']['score']]} top-1 {100 * top1:.1f}% (chance {100 * result['chance']:.1f}%)")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """results.json, results.md and confusion_<dataset>.png in out_dir/<step_NNNNNNNN>/ (kept per
    checkpoint); results.json and results.md in out_dir are copies of the latest. Returns the kept pair."""
    out_dir = check_output_dir(out_dir)
    kept = out_dir / results_dir_name(results)
    if _fingerprint_in(kept) not in (None, results["model_fingerprint"]):  # the same step of another run
        kept = kept.with_name(f"{kept.name}-{results['model_fingerprint'][:12]}")
    kept.mkdir(parents=True, exist_ok=True)
    warnings = "".join(f"\n> warning: {z['warning']}\n" for z in results["zero_shot"].values() if z.get("warning"))
    text = json.dumps(_finite_or_null(results), indent=1)
    table = markdown_table([results]) + warnings + validation_markdown(results)
    for folder in (kept, out_dir):
        write_text_atomic(folder / "results.json", text)
        write_text_atomic(folder / "results.md", table)
    for name, result in results["zero_shot"].items():
        plot_confusion(result, name, kept / f"confusion_{name}.png")
    return kept / "results.json", kept / "results.md"
