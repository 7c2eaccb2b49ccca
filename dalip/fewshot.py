"""Few-shot classifiers on frozen, cached, L2-normalised features (DESIGN §9).

Every method gets the same `Task` — support features and labels, test features, class text
embeddings — and returns test logits plus the hyperparameters it chose. Hyperparameters are chosen on
the support set only (leave-one-out for the training-free cache, a per-class half split otherwise),
never on the test split; where the support set is too small to split (1 shot) the documented defaults
are used and recorded as such.

* zero-shot: 100 · f · Wᵀ.
* linear probe: multinomial logistic regression (scikit-learn), C chosen on the support split.
* Tip-Adapter (Zhang et al., 2022): 100 · f · Wᵀ + α · exp(−β (1 − f · Fᵀ)) · L, keys F = support
  features, values L = one-hot labels; (α, β) by leave-one-out grid search on the support set.
* Tip-Adapter-F: the same with the keys F fine-tuned (cross-entropy from the paper's initial α, β,
  each support image against the cache of the others), then (α, β) searched on the support split.
* DAC (Gondal et al., 2024, from the paper's description): a residual MLP image adapter (zero-initialised
  output, so it starts as the identity) trained with a supervised image–image contrastive loss, plus a
  per-class residual on the text embeddings, trained with the image–text cross-entropy; one weight
  regularises both towards the frozen model (squared drift of the text embeddings and of the adapted
  image features). Predictions add an intra-modal cache on the adapted features. The regularisation
  weight and the cache weight are chosen on the support split.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE = 100.0  # CLIP's trained temperature; Tip-Adapter's formula uses it as is
TIP_ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
TIP_BETAS = (0.5, 1.0, 2.0, 3.5, 5.5, 7.0, 10.0)
TIP_DEFAULT = (1.0, 5.5)  # the paper's ImageNet initialisation, for a 1-image support set
PROBE_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
PROBE_DEFAULT_C = 1.0
TIP_F_STEPS, TIP_F_LR = 200, 1e-3
DAC_STEPS, DAC_LR, DAC_TEMPERATURE = 200, 1e-3, 0.1
DAC_REGS = (0.1, 1.0, 10.0, 100.0)  # large: adapter and text stay near the frozen model
DAC_CACHE_ALPHAS = (0.0, 1.0, 2.0)
DAC_DEFAULT = (1.0, 1.0)  # (text regularisation, cache weight) when the support set cannot be split


@dataclass
class Task:
    support: torch.Tensor  # (n, E), unit rows
    support_labels: torch.Tensor  # (n,)
    test: torch.Tensor  # (m, E)
    text: torch.Tensor  # (C, E) class text embeddings
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def one_hot(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    return F.one_hot(labels, num_classes).to(dtype)


def support_split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(train, val) index tensors: per class the first half of its support images train, the rest
    validate (support order is already random per fold). None when a class has a single image."""
    train, val = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            return None
        half = len(idx) // 2
        train.append(idx[:half])
        val.append(idx[half:])
    return torch.cat(train), torch.cat(val)


# ---------------------------------------------------------------------------------------------------
# Zero-shot and Tip-Adapter


def zero_shot(task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
    return LOGIT_SCALE * task.test @ task.text.T, {}


def tip_logits(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, text: torch.Tensor | None, alpha: float, beta: float,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Tip-Adapter's logits; text None: the cache term alone. exclude_self: query i is key i and is left
    out of its own cache (leave-one-out)."""
    affinity = torch.exp(-beta * (1 - query @ keys.T))
    if exclude_self:
        affinity = affinity * (1 - torch.eye(len(query), dtype=affinity.dtype, device=affinity.device))
    cache = affinity @ values
    return alpha * cache if text is None else LOGIT_SCALE * query @ text.T + alpha * cache


def tip_search(task: Task, keys: torch.Tensor | None = None) -> tuple[float, float, str]:
    """(α, β, how chosen): leave-one-out accuracy on the support set over the grid; ties keep the
    first (smallest α: no cache unless it helps)."""
    keys = task.support if keys is None else keys
    values = one_hot(task.support_labels, task.num_classes, keys.dtype)
    if len(task.support) <= task.num_classes:  # one image per class: leave-one-out empties the cache
        return *TIP_DEFAULT, "default (1 shot)"
    best, best_acc = TIP_DEFAULT, -1.0
    for beta in TIP_BETAS:
        for alpha in TIP_ALPHAS:
            acc = accuracy(tip_logits(task.support, keys, values, task.text, alpha, beta, exclude_self=True), task.support_labels)
            if acc > best_acc:
                best, best_acc = (alpha, beta), acc
    return *best, "leave-one-out on the support set"


def tip_adapter(task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
    alpha, beta, how = tip_search(task)
    values = one_hot(task.support_labels, task.num_classes, task.support.dtype)
    return tip_logits(task.test, task.support, values, task.text, alpha, beta), {"alpha": alpha, "beta": beta, "chosen_by": how}


def _fine_tune_keys(support: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, seed: int) -> torch.Tensor:
    """Tip-Adapter-F's training: the cache keys learn by cross-entropy, with the paper's initial
    (α, β), each support image classified against the cache of the others."""
    alpha, beta = TIP_DEFAULT
    values = one_hot(labels, text.shape[0], support.dtype)
    torch.manual_seed(seed)
    keys = nn.Parameter(support.clone())
    optimizer = torch.optim.AdamW([keys], lr=TIP_F_LR, eps=1e-4)
    for _ in range(TIP_F_STEPS):
        loss = F.cross_entropy(tip_logits(support, keys, values, text, alpha, beta, exclude_self=True), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return keys.detach()


def tip_adapter_f(task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
    """Keys fine-tuned; then (α, β) searched, as in the paper, but on the held-back half of the
    support set (keys fine-tuned on the other half) instead of on test images."""
    (alpha, beta), how = TIP_DEFAULT, "default (1 shot)"
    split = support_split(task.support_labels)
    if split is not None:
        train, val = split
        keys = _fine_tune_keys(task.support[train], task.support_labels[train], task.text, task.seed)
        values = one_hot(task.support_labels[train], task.num_classes, keys.dtype)
        best = -1.0
        for b in TIP_BETAS:
            for a in TIP_ALPHAS:
                acc = accuracy(tip_logits(task.support[val], keys, values, task.text, a, b), task.support_labels[val])
                if acc > best:
                    best, alpha, beta = acc, a, b
        how = "half split of the support set"
    keys = _fine_tune_keys(task.support, task.support_labels, task.text, task.seed)
    values = one_hot(task.support_labels, task.num_classes, keys.dtype)
    logits = tip_logits(task.test, keys, values, task.text, alpha, beta)
    return logits, {"alpha": alpha, "beta": beta, "chosen_by": how, "steps": TIP_F_STEPS, "lr": TIP_F_LR}


# ---------------------------------------------------------------------------------------------------
# Linear probe


def _fit_probe(x: torch.Tensor, y: torch.Tensor, c: float, num_classes: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=c, max_iter=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x.double().numpy(), y.numpy())
    return probe


def _probe_logits(probe, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scores for all classes (a class absent from the fit gets −inf)."""
    out = torch.full((len(x), num_classes), -math.inf, dtype=torch.float64)
    out[:, torch.as_tensor(probe.classes_)] = torch.as_tensor(probe.decision_function(x.double().numpy())).reshape(len(x), -1)
    return out


def linear_probe(task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
    split = support_split(task.support_labels)
    c, how = PROBE_DEFAULT_C, "default (1 shot)"
    if split is not None:
        train, val = split
        scores = []
        for candidate in PROBE_CS:
            probe = _fit_probe(task.support[train], task.support_labels[train], candidate, task.num_classes)
            scores.append(accuracy(_probe_logits(probe, task.support[val], task.num_classes), task.support_labels[val]))
        c, how = PROBE_CS[scores.index(max(scores))], "half split of the support set"
    probe = _fit_probe(task.support, task.support_labels, c, task.num_classes)
    return _probe_logits(probe, task.test, task.num_classes), {"C": c, "chosen_by": how}


# ---------------------------------------------------------------------------------------------------
# DAC


class DACHead(nn.Module):
    """Residual image adapter (identity at init) and per-class text residuals (zero at init)."""

    def __init__(self, text: torch.Tensor, hidden: int | None = None):
        super().__init__()
        dim = text.shape[1]
        hidden = hidden or max(16, dim // 4)
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.register_buffer("text", text.clone())
        self.delta = nn.Parameter(torch.zeros_like(text))

    def image(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f + self.up(F.relu(self.down(f))), dim=-1)

    def classes(self) -> torch.Tensor:
        return F.normalize(self.text + self.delta, dim=-1)


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al., 2020) over one view: same class = positive; anchors without a positive
    (a class with one image) do not contribute."""
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, -math.inf)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has = counts > 0
    if not has.any():
        return z.new_zeros(())
    per_anchor = log_prob.masked_fill(~positives, 0).sum(dim=1)[has] / counts[has]
    return -per_anchor.mean()


def train_dac(support: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, reg: float, seed: int) -> DACHead:
    torch.manual_seed(seed)
    head = DACHead(text.float())
    optimizer = torch.optim.AdamW(head.parameters(), lr=DAC_LR, weight_decay=1e-4)
    support = support.float()
    for _ in range(DAC_STEPS):
        z = head.image(support)
        inter = F.cross_entropy(LOGIT_SCALE * z @ head.classes().T, labels)
        intra = supervised_contrastive(z, labels, DAC_TEMPERATURE)
        drift = head.delta.pow(2).sum(dim=1).mean() + (z - support).pow(2).sum(dim=1).mean()
        loss = inter + intra + reg * drift
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def dac_logits(head: DACHead, query, support, labels, num_classes: int, cache_alpha: float, beta: float) -> torch.Tensor:
    q, keys = head.image(query.float()), head.image(support.float())
    return tip_logits(q, keys, one_hot(labels, num_classes), head.classes(), cache_alpha, beta)


def dac(task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
    _, beta, _ = tip_search(task)
    (reg, cache_alpha), how = DAC_DEFAULT, "default (1 shot)"
    split = support_split(task.support_labels)
    if split is not None:
        train, val = split
        best = -1.0
        for candidate in DAC_REGS:
            head = train_dac(task.support[train], task.support_labels[train], task.text, candidate, task.seed)
            for a in DAC_CACHE_ALPHAS:
                logits = dac_logits(head, task.support[val], task.support[train], task.support_labels[train], task.num_classes, a, beta)
                acc = accuracy(logits, task.support_labels[val])
                if acc > best:
                    best, reg, cache_alpha = acc, candidate, a
        how = "half split of the support set"
    head = train_dac(task.support, task.support_labels, task.text, reg, task.seed)
    logits = dac_logits(head, task.test, task.support, task.support_labels, task.num_classes, cache_alpha, beta)
    return logits, {"text_reg": reg, "cache_alpha": cache_alpha, "beta": beta, "chosen_by": how, "steps": DAC_STEPS}


METHODS: dict[str, Callable[[Task], tuple[torch.Tensor, dict[str, Any]]]] = {
    "zero-shot": zero_shot,
    "linear-probe": linear_probe,
    "tip": tip_adapter,
    "tip-f": tip_adapter_f,
    "dac": dac,
}
METHOD_LABELS = {"zero-shot": "Zero-shot", "linear-probe": "Linear probe", "tip": "Tip-Adapter", "tip-f": "Tip-Adapter-F", "dac": "DAC"}
