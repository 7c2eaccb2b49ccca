"""Multi-head Brownian Distance Covariance (MBDC): a tower's second-order embedding (DESIGN §2.1-2.2).

`bdc_matrix` turns token features into double-centred BDC matrices; `MBDC` maps a tower's projected
token features to an L2-normalised embedding z2 built from per-head BDC matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalip import DalipError
from dalip.config import MBDCOptions

_DEFAULTS = MBDCOptions()  # the defaults live in the config model, once

# Fill value for masked cosine similarities: cosines lie in [-1, 1], so exp(-1e4) is exactly 0 in
# every float format and a row with nothing valid gives finite (then zeroed) weights, never NaN.
_MASKED_SIMILARITY = -1e4


def bdc_matrix(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    temperature: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Double-centred Brownian distance matrix of the d channels of each sample, observed over tokens.

    x: (B, M, d) token features; mask: optional (B, M) bool of valid tokens (masked tokens do not
    count, exactly as if sliced away). temperature: tau, a float or a tensor of shape () or (B,)
    (learnable variants pass a tensor); default tau = 1 / (2 * valid tokens per sample).
    Returns (B, d, d) in float32 (float64 if x is float64), also under autocast: the
    G_ii + G_jj - 2 G_ij cancellation is catastrophic in bf16/fp16.
    """
    if x.dim() != 3:
        raise ValueError(f"bdc_matrix: x must have shape (B, M, d), got {tuple(x.shape)}")
    batch, tokens, _ = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype)
        if mask is None:
            count = x.new_full((batch,), float(tokens))
        else:
            if mask.shape != (batch, tokens):
                raise ValueError(f"bdc_matrix: mask must have shape {(batch, tokens)}, got {tuple(mask.shape)}")
            weight = mask.to(dtype)
            x = x * weight.unsqueeze(-1)  # zeroed tokens add nothing to any channel distance
            count = weight.sum(dim=1).clamp_min(1.0)
        if temperature is None:
            tau = (0.5 / count).view(batch, 1, 1)
        else:
            tau = torch.as_tensor(temperature, device=x.device).to(dtype)
            if tau.dim() == 1 and tau.shape[0] == batch:
                tau = tau.view(batch, 1, 1)
            elif tau.dim() != 0:
                raise ValueError(f"bdc_matrix: temperature must be a scalar or have shape ({batch},)")

        return _centred_distance(torch.bmm(x.transpose(1, 2), x), tau, eps)


def _centred_distance(gram: torch.Tensor, tau: torch.Tensor, eps: float) -> torch.Tensor:
    """Steps 2-4 of DESIGN §2.1 from the (B, d, d) Gram matrix; call with autocast disabled."""
    sq_norm = gram.diagonal(dim1=1, dim2=2)
    dist = (sq_norm.unsqueeze(2) + sq_norm.unsqueeze(1) - 2.0 * gram).clamp_min(0.0)
    a = torch.sqrt(tau * dist + eps)  # eps keeps the gradient finite where channels coincide
    row_mean = a.mean(dim=2, keepdim=True)
    col_mean = a.mean(dim=1, keepdim=True)
    return a - row_mean - col_mean + row_mean.mean(dim=1, keepdim=True)


class MBDC(nn.Module):
    """Second-order embedding of one tower (DESIGN §2.2).

    Step 3's normalisation is a LayerNorm over each head's d reduced channels, token by token: its
    statistics are per (token, head), so heads never mix (unlike a BatchNorm shared by the heads),
    and its affine is shared by the heads like the reduce Linear before it. It needs no batch
    statistics (no train/eval gap, no cross-rank sync, padded text tokens cannot leak into valid
    ones) and runs before the token weighting, so the weighting is not normalised away.

    The anchor token (CLS / EOT) only steers the weighting: the BDC runs over the valid non-anchor
    tokens, each scaled by its softmax weight times their number (mean weight 1).
    """

    def __init__(
        self,
        embed_dim: int,
        heads: int = _DEFAULTS.heads,
        reduce_dim: int = _DEFAULTS.reduce_dim,
        dropout: float = _DEFAULTS.dropout,
        learnable_temperature: bool = _DEFAULTS.learnable_temperature,
        hidden_linear: bool = _DEFAULTS.hidden_linear,
        eps: float = 1e-5,
    ):
        super().__init__()
        if heads < 1 or embed_dim % heads:
            raise DalipError(f"mbdc: heads={heads} must divide the embedding width {embed_dim}")
        if reduce_dim < 1:
            raise DalipError(f"mbdc: reduce_dim must be positive, got {reduce_dim}")
        if not 0.0 <= dropout < 1.0:
            raise DalipError(f"mbdc: dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.heads = heads
        self.reduce_dim = reduce_dim
        self.dropout = dropout
        self.eps = eps
        self.out_dim = heads * reduce_dim * (reduce_dim + 1) // 2  # upper triangles with diagonal

        self.proj = nn.Linear(embed_dim, embed_dim, bias=False)  # step 1
        self.reduce = nn.Linear(embed_dim // heads, reduce_dim, bias=False)  # step 3, shared by heads
        self.norm = nn.LayerNorm(reduce_dim)
        # tau = exp(t) / (2M): t = 0 is DeepBDC's init log(1/(2M)), and the scale stays right when M
        # varies per sample (text).
        self.log_temperature = nn.Parameter(torch.zeros(heads)) if learnable_temperature else None
        rows, cols = torch.triu_indices(reduce_dim, reduce_dim)
        self.register_buffer("triu_index", rows * reduce_dim + cols, persistent=False)
        self.out_norm = nn.LayerNorm(self.out_dim)
        self.hidden = nn.Linear(self.out_dim, self.out_dim) if hidden_linear else None
        self.out_proj = nn.Linear(self.out_dim, embed_dim)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, heads={self.heads}, reduce_dim={self.reduce_dim}, "
                f"dropout={self.dropout}, out_dim={self.out_dim}")

    def reduce_weight(self) -> torch.Tensor:
        """Steps 1-3 as one (heads * d, E) matrix: block-diag(reduce) @ proj.

        No nonlinearity separates step 1 from step 3 and the E-wide features are never used on their
        own, so applying the product costs 2·E·h·d per token instead of 2·E² + 2·E·d.
        """
        head_dim = self.embed_dim // self.heads
        proj = self.proj.weight.view(self.heads, head_dim, self.embed_dim)
        return torch.einsum("dk,hke->hde", self.reduce.weight, proj).reshape(-1, self.embed_dim)

    def forward(self, tokens: torch.Tensor, anchor_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, M, E), anchor_index (B,) long, mask (B, M) bool of valid tokens -> z2 (B, E), unit norm."""
        batch, length, width = tokens.shape
        if width != self.embed_dim:
            raise ValueError(f"MBDC: expected token width {self.embed_dim}, got {width}")
        heads, d = self.heads, self.reduce_dim

        # Steps 1-3: projection, head split, shared reduction, LayerNorm, ReLU; laid out (B, h, M, d).
        x = F.linear(tokens.to(self.proj.weight.dtype), self.reduce_weight())
        x = x.view(batch, length, heads, d).transpose(1, 2).contiguous()
        x = F.relu_(self.norm(x))

        # Step 4: per head, softmax over valid non-anchor tokens of the cosine to the anchor.
        rows = torch.arange(batch, device=x.device)
        positions = torch.arange(length, device=x.device)
        keep = mask.bool() & (positions.unsqueeze(0) != anchor_index.unsqueeze(1))  # (B, M)
        anchor = x[rows, :, anchor_index]  # (B, h, d)
        dot = torch.matmul(x, anchor.unsqueeze(-1)).squeeze(-1)  # (B, h, M)
        norms = x.norm(dim=-1).clamp_min(1e-12) * anchor.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cosine = (dot / norms).masked_fill(~keep.unsqueeze(1), _MASKED_SIMILARITY)
        count = keep.sum(dim=1)  # (B,)
        weights = torch.softmax(cosine.float(), dim=-1) * (keep * count.unsqueeze(1)).unsqueeze(1)

        with torch.autocast(device_type=x.device.type, enabled=False):
            # Step 6 (Gram part), all heads in one batched call; float32 as in bdc_matrix.
            x = (x.float() * weights.unsqueeze(-1)).view(batch * heads, length, d)
            gram = torch.bmm(x.transpose(1, 2), x)
            # Step 5: channel dropout, one draw per (sample, head, channel) shared by all its tokens.
            # Zeroing channel i of the tokens zeroes row and column i of the Gram, so drop there.
            if self.training and self.dropout > 0.0:
                keep_channel = torch.empty(batch * heads, d, device=x.device, dtype=x.dtype)
                keep_channel.bernoulli_(1.0 - self.dropout).div_(1.0 - self.dropout)
                gram = gram * (keep_channel.unsqueeze(2) * keep_channel.unsqueeze(1))
            tau = (0.5 / count.clamp_min(1).to(x.dtype)).unsqueeze(1).expand(batch, heads)
            if self.log_temperature is not None:
                tau = tau * self.log_temperature.float().exp()
            bdc = _centred_distance(gram, tau.reshape(batch * heads, 1, 1), self.eps)

        # Steps 7-8: upper triangles (row-major, with diagonal), heads concatenated, LN, Linear.
        z = bdc.flatten(1).index_select(1, self.triu_index).reshape(batch, self.out_dim)
        z = self.out_norm(z.to(self.out_norm.weight.dtype))  # back to bf16/fp16 under pure_* precision
        if self.hidden is not None:
            z = self.hidden(z)
        return F.normalize(self.out_proj(z), dim=-1)
