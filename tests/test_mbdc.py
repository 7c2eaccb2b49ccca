import pytest
import torch
import torch.nn.functional as F

from dalip import DalipError
from dalip.mbdc import MBDC, bdc_matrix


def plain_bdc(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """DESIGN §2.1 for one sample, written out: x is (M, d) with M valid tokens."""
    m, d = x.shape
    X = x.T  # channels are the variables, tokens the observations
    G = X @ X.T
    D = torch.empty(d, d, dtype=x.dtype)
    for i in range(d):
        for j in range(d):
            D[i, j] = max(G[i, i] + G[j, j] - 2 * G[i, j], 0.0)
    A = torch.sqrt(D / (2 * m) + eps)
    return A - A.mean(dim=1, keepdim=True) - A.mean(dim=0, keepdim=True) + A.mean()


def test_bdc_matches_plain_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    out = bdc_matrix(x)
    assert out.shape == (3, 5, 5) and out.dtype == torch.float32
    for b in range(3):
        torch.testing.assert_close(out[b], plain_bdc(x[b]), atol=1e-5, rtol=0)


def test_bdc_mask_equals_slicing():
    torch.manual_seed(1)
    x = torch.randn(3, 9, 6)
    lengths = [9, 4, 1]
    mask = torch.arange(9).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    x_noisy = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x) * 100)  # junk in masked slots
    out = bdc_matrix(x_noisy, mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b], plain_bdc(x[b, :n]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[b], bdc_matrix(x[b:b + 1, :n])[0], atol=1e-6, rtol=0)


def test_bdc_mask_need_not_be_a_prefix():
    torch.manual_seed(2)
    x = torch.randn(1, 6, 4)
    mask = torch.tensor([[True, False, True, True, False, True]])
    torch.testing.assert_close(bdc_matrix(x, mask)[0], plain_bdc(x[0, mask[0]]), atol=1e-5, rtol=0)


def test_bdc_temperature_default_and_tensor():
    torch.manual_seed(3)
    x = torch.randn(2, 8, 4)
    torch.testing.assert_close(bdc_matrix(x, temperature=1 / 16), bdc_matrix(x))
    per_sample = torch.tensor([1 / 16, 1 / 16])
    torch.testing.assert_close(bdc_matrix(x, temperature=per_sample), bdc_matrix(x))
    with pytest.raises(ValueError):
        bdc_matrix(x, temperature=torch.ones(3))


def test_bdc_gradcheck_float64():
    torch.manual_seed(4)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    assert bdc_matrix(x).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: bdc_matrix(t), (x,))
    assert torch.autograd.gradcheck(lambda t: bdc_matrix(t, mask), (x,))
    tau = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, s: bdc_matrix(t, mask, temperature=s), (x, tau))


def test_bdc_gradient_finite_where_channels_coincide():
    x = torch.randn(2, 6, 4)
    x[:, :, 1] = x[:, :, 0]  # D_01 = 0: sqrt would have an infinite slope without eps
    x[1] = 0.0  # every distance zero
    x.requires_grad_(True)
    out = bdc_matrix(x)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_bdc_float32_under_bf16_autocast():
    torch.manual_seed(5)
    x = torch.randn(2, 10, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bdc_matrix(x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, bdc_matrix(x.to(torch.bfloat16).float()))


def test_bdc_rejects_bad_shapes():
    with pytest.raises(ValueError):
        bdc_matrix(torch.randn(4, 5))
    with pytest.raises(ValueError):
        bdc_matrix(torch.randn(2, 5, 3), torch.ones(2, 4, dtype=torch.bool))


def plain_mbdc(module: MBDC, tokens, anchor_index, mask):
    """DESIGN §2.2 steps 1-8 sample by sample and head by head, dropout off."""
    h, d = module.heads, module.reduce_dim
    outs = []
    for b in range(tokens.shape[0]):
        x = tokens[b] @ module.proj.weight.T  # step 1
        a = int(anchor_index[b])
        heads = []
        for k in range(h):
            xk = x[:, k * (x.shape[1] // h):(k + 1) * (x.shape[1] // h)] @ module.reduce.weight.T  # 2-3
            xk = F.layer_norm(xk, (d,), module.norm.weight, module.norm.bias, module.norm.eps)
            xk = torch.relu(xk)
            others = [t for t in range(x.shape[0]) if mask[b, t] and t != a]  # step 4
            cos = torch.stack([F.cosine_similarity(xk[t], xk[a], dim=0, eps=1e-12) for t in others])
            w = torch.softmax(cos, dim=0) * len(others)
            weighted = xk[others] * w.unsqueeze(1)
            A = plain_bdc(weighted, eps=module.eps)  # step 6
            rows, cols = torch.triu_indices(d, d)  # step 7
            heads.append(A[rows, cols])
        z = module.out_norm(torch.cat(heads))  # step 8
        outs.append(F.normalize(module.out_proj(z), dim=0))
    return torch.stack(outs)


def test_mbdc_matches_plain_steps_with_masks():
    torch.manual_seed(6)
    module = MBDC(32, heads=4, reduce_dim=5).eval()
    tokens = torch.randn(3, 7, 32)
    anchor = torch.tensor([0, 4, 2])
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2, [True] * 3 + [False] * 4])
    torch.testing.assert_close(module(tokens, anchor, mask), plain_mbdc(module, tokens, anchor, mask),
                               atol=1e-5, rtol=0)


def test_mbdc_ignores_masked_tokens():
    torch.manual_seed(7)
    module = MBDC(64, heads=2, reduce_dim=6).eval()
    tokens = torch.randn(2, 9, 64)
    anchor = torch.tensor([5, 2])
    mask = torch.arange(9).unsqueeze(0) <= anchor.unsqueeze(1)  # text-style: up to and including EOT
    noisy = torch.where(mask.unsqueeze(-1), tokens, torch.randn_like(tokens) * 10)
    torch.testing.assert_close(module(tokens, anchor, mask), module(noisy, anchor, mask))
    short = module(tokens[:1, :6], anchor[:1], mask[:1, :6])
    torch.testing.assert_close(module(tokens, anchor, mask)[:1], short, atol=1e-6, rtol=0)


def test_mbdc_out_dim_and_state():
    module = MBDC(512)
    assert module.out_dim == 4324 == 4 * 46 * 47 // 2
    assert "triu_index" not in module.state_dict()
    assert module.triu_index.shape == (46 * 47 // 2,)


@pytest.mark.parametrize("embed_dim", [64, 256, 512, 768, 1024])
@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_mbdc_shapes_unit_norm_and_bf16_autocast(embed_dim, heads):
    torch.manual_seed(embed_dim + heads)
    module = MBDC(embed_dim, heads=heads)
    tokens = torch.randn(2, 6, embed_dim)
    anchor = torch.tensor([0, 3])
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    z = module(tokens, anchor, mask)
    assert z.shape == (2, embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    z.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = module.eval()(tokens, anchor, mask)
    assert torch.isfinite(zb).all()
    torch.testing.assert_close(zb.float().norm(dim=-1), torch.ones(2), atol=1e-2, rtol=0)


def test_mbdc_dropout_only_in_training():
    torch.manual_seed(8)
    module = MBDC(64, heads=2, reduce_dim=8)
    tokens, anchor = torch.randn(2, 5, 64), torch.zeros(2, dtype=torch.long)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert not torch.allclose(module(tokens, anchor, mask), module(tokens, anchor, mask))
    module.eval()
    torch.testing.assert_close(module(tokens, anchor, mask), module(tokens, anchor, mask))


def test_mbdc_no_valid_other_token_is_finite():
    module = MBDC(64, heads=2, reduce_dim=4).eval()
    tokens = torch.randn(1, 4, 64, requires_grad=True)
    mask = torch.tensor([[True, False, False, False]])  # only the anchor is valid
    z = module(tokens, torch.tensor([0]), mask)
    z.sum().backward()
    assert torch.isfinite(z).all() and torch.isfinite(tokens.grad).all()


def test_mbdc_learnable_temperature_and_hidden_linear():
    torch.manual_seed(9)
    plain = MBDC(64, heads=4, reduce_dim=6).eval()
    learnable = MBDC(64, heads=4, reduce_dim=6, learnable_temperature=True).eval()
    learnable.load_state_dict(plain.state_dict(), strict=False)
    tokens, anchor = torch.randn(2, 7, 64), torch.tensor([0, 6])
    mask = torch.tensor([[True] * 7, [True] * 7])
    z = learnable(tokens, anchor, mask)
    torch.testing.assert_close(z, plain(tokens, anchor, mask))  # t = 0 is the default tau
    z.sum().backward()
    assert learnable.log_temperature.grad is not None and learnable.log_temperature.grad.abs().sum() > 0
    hidden = MBDC(64, heads=4, reduce_dim=6, hidden_linear=True)
    assert hidden(tokens, anchor, mask).shape == (2, 64)


def test_mbdc_rejects_bad_config():
    with pytest.raises(DalipError):
        MBDC(100, heads=3)
    with pytest.raises(DalipError):
        MBDC(64, dropout=1.0)
