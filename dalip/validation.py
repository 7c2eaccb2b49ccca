"""Per-domain held-out contrastive loss (DESIGN §5): the targets of the data mixing laws.

Contrastive loss depends on the negatives in a batch, so the loss is computed over fixed batches:
the pairs sorted by sample key, cut into consecutive batches of `loss_batch_size`, each encoded in one
forward pass. The DataLoader only decodes images, so its batch size and worker count cannot change a
figure: the same checkpoint gives the same losses bit for bit. Pairs past the last full batch are
counted and reported (`unused_pairs`), never silently dropped.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import Field
from torch.utils.data import DataLoader

from dalip.config import Name, StrictConfig
from dalip.data import EvalShards, decode_caption, decode_image, expand_shards, parse_caption_field, read_shard
from dalip.errors import DalipError
from dalip.loss import DALIPLoss

log = logging.getLogger(__name__)

LOSS_BATCH_SIZE = 32
LOSS_KINDS = ("first", "second", "combined")


class ValidationSpec(StrictConfig):
    """Domain-pure held-out image–text pairs, as shards."""

    name: Name
    shards: str
    domain: Literal["plant", "general"]
    caption_field: str = Field("txt", description="txt or a .json key; comma = fallbacks")


class KeyedPairs(EvalShards):
    """(key, image tensor, caption) of every sample; an unreadable sample is an error, not a skip."""

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        for url in self.worker_urls():
            errors: list[Exception] = []
            for sample in read_shard(url, errors):
                try:
                    yield sample["__key__"], self.transform(decode_image(sample)), decode_caption(sample, self.text_fields)
                except ValueError as e:
                    raise DalipError(f"validation sample {url}:{sample.get('__key__')}: {e}") from None
            if errors:
                raise DalipError(f"validation shard {url} is unreadable: {errors[0]}")


def load_pairs(spec: ValidationSpec, preprocess: Callable, batch_size: int, workers: int) -> list[tuple[str, torch.Tensor, str]]:
    """All pairs of a validation set, sorted by key (the fixed order the batches are cut from)."""
    urls = [u for source in expand_shards(spec.shards) for u in source]
    dataset = KeyedPairs(urls, preprocess, parse_caption_field(spec.caption_field))
    pairs: list[tuple[str, torch.Tensor, str]] = []
    for keys, images, texts in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        pairs += zip(keys, images.unbind(0), texts)
    if len({k for k, _, _ in pairs}) != len(pairs):
        raise DalipError(f"validation set {spec.name}: sample keys are not unique")
    return sorted(pairs, key=lambda p: p[0])


@torch.no_grad()
def validation_loss(
    model, preprocess: Callable, tokenizer: Callable, spec: ValidationSpec, *, alpha: float,
    loss_batch_size: int = LOSS_BATCH_SIZE, batch_size: int = 64, workers: int = 0, device: Any = "cpu",
) -> dict[str, Any]:
    """Mean over the fixed batches of the first-order, second-order and combined DALIP loss."""
    pairs = load_pairs(spec, preprocess, batch_size, workers)
    n_batches = len(pairs) // loss_batch_size
    if n_batches == 0:
        raise DalipError(f"validation set {spec.name}: {len(pairs)} pairs, fewer than one loss batch of {loss_batch_size}")
    loss_fn = DALIPLoss(alpha=alpha, mode="dalip")
    sums = dict.fromkeys(LOSS_KINDS, 0.0)
    for b in range(n_batches):
        batch = pairs[b * loss_batch_size : (b + 1) * loss_batch_size]
        images = torch.stack([p[1] for p in batch]).to(device)
        texts = tokenizer([p[2] for p in batch]).to(device)
        _, parts = loss_fn(model(images, texts))
        for kind, key in zip(LOSS_KINDS, ("loss_first", "loss_second", "total")):
            sums[kind] += float(parts[key].double())
    unused = len(pairs) - n_batches * loss_batch_size
    if unused:
        log.warning("validation set %s: %d pair(s) past the last full batch of %d are not used", spec.name, unused, loss_batch_size)
    return {"domain": spec.domain, "num_pairs": len(pairs), "loss_batch_size": loss_batch_size, "num_batches": n_batches,
            "unused_pairs": unused, **{k: v / n_batches for k, v in sums.items()}}  # fmt: skip


def validation_losses(encoder, specs: list[ValidationSpec], cfg, device) -> dict[str, Any]:
    """Every validation set of an eval config (alpha, loss_batch_size, batch_size, workers) for a dalip
    model (`dalip.encoders.Encoder` with second-order embeddings: the loss has both terms)."""
    if specs and not encoder.second_order:
        raise DalipError("validation loss needs a dalip model (first- and second-order terms); this one is plain open_clip")
    return {
        spec.name: validation_loss(encoder.model, encoder.preprocess, encoder.tokenizer, spec, alpha=cfg.alpha,
                                   loss_batch_size=cfg.loss_batch_size, batch_size=cfg.batch_size, workers=cfg.workers,
                                   device=device)
        for spec in specs
    }  # fmt: skip


def validation_markdown(results: dict[str, Any]) -> str:
    """The validation-loss table of one results dict ('' when there is none)."""
    rows = results.get("validation") or {}
    if not rows:
        return ""
    lines = ["", "| Validation set | Domain | Pairs | Loss batch | First-order | Second-order | Combined |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, v in rows.items():
        lines.append(f"| {name} | {v['domain']} | {v['num_pairs']} | {v['loss_batch_size']} | "
                     f"{v['first']:.4f} | {v['second']:.4f} | {v['combined']:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
