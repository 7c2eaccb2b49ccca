"""DALIP loss (DESIGN §2.3): alpha * CLIP(z1) + (1 - alpha) * CLIP(z2) with one shared logit scale.

CLIP(.,.) is open_clip's symmetric InfoNCE. Under DDP features from all ranks are gathered (with
gradient by default, as open_clip's --gather-with-grad), all terms in a single collective. `mode="clip"`
runs the same code with the first-order term only, so an ablation differs in nothing but the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from dalip import DalipError

MODES = ("dalip", "clip")


class DALIPLoss(nn.Module):
    def __init__(
        self,
        alpha: float = 0.5,
        mode: str = "dalip",
        local_loss: bool = True,
        gather_with_grad: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if mode not in MODES:
            raise DalipError(f"loss: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= alpha <= 1.0:
            raise DalipError(f"loss: alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.mode = mode
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self._labels: dict[tuple[torch.device, int], torch.Tensor] = {}

    def forward(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """outputs: DALIP.forward's dict. Returns (total, {loss_first, [loss_second,] total})."""
        features = [outputs["image_features"], outputs["text_features"]]
        if self.mode == "dalip":
            features += [outputs["image_features_2"], outputs["text_features_2"]]
        gathered = self._gather(features) if self.world_size > 1 else features
        scale = outputs["logit_scale"]
        terms = [
            self._contrastive(features[i], features[i + 1], gathered[i], gathered[i + 1], scale)
            for i in range(0, len(features), 2)
        ]
        parts = {"loss_first": terms[0]}
        if self.mode == "dalip":
            parts["loss_second"] = terms[1]
            total = self.alpha * terms[0] + (1.0 - self.alpha) * terms[1]
        else:
            total = terms[0]
        parts["total"] = total
        return total, parts

    def _gather(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """All ranks' features, concatenated over the batch, in one collective for every tensor."""
        widths = [f.shape[1] for f in features]
        local = torch.cat(features, dim=1)
        if self.gather_with_grad:
            chunks = list(dist_fn.all_gather(local))
        else:
            chunks = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(chunks, local.detach())
            if not self.local_loss:
                chunks[self.rank] = local  # keep this rank's gradient path, as open_clip does
        return list(torch.cat(chunks, dim=0).split(widths, dim=1))

    def _contrastive(self, image, text, all_image, all_text, scale) -> torch.Tensor:
        if self.world_size > 1 and self.local_loss:
            logits_per_image = scale * image @ all_text.T
            logits_per_text = scale * text @ all_image.T
        else:
            logits_per_image = scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
        labels = self._ground_truth(logits_per_image.device, logits_per_image.shape[0])
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def _ground_truth(self, device: torch.device, rows: int) -> torch.Tensor:
        key = (device, rows)
        labels = self._labels.get(key)
        if labels is None:
            labels = torch.arange(rows, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + rows * self.rank
            self._labels[key] = labels
        return labels
