import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dalip import DalipError
from dalip.loss import DALIPLoss


def open_clip_loss():
    # open_clip takes seconds to import; keep it out of module scope so spawned ranks start fast
    from open_clip.loss import ClipLoss

    return ClipLoss()


def fake_outputs(batch: int = 6, width: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {key: F.normalize(torch.randn(batch, width, generator=generator), dim=-1)
           for key in ("image_features", "text_features", "image_features_2", "text_features_2")}
    out["logit_scale"] = torch.tensor(14.3)
    return out


def test_clip_mode_equals_open_clip_clip_loss():
    out = fake_outputs()
    total, parts = DALIPLoss(mode="clip")(out)
    expected = open_clip_loss()(out["image_features"], out["text_features"], out["logit_scale"])
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"loss_first", "total"}


def test_dalip_mode_mixes_both_terms():
    out = fake_outputs(seed=1)
    total, parts = DALIPLoss(alpha=0.3)(out)
    first = open_clip_loss()(out["image_features"], out["text_features"], out["logit_scale"])
    second = open_clip_loss()(out["image_features_2"], out["text_features_2"], out["logit_scale"])
    torch.testing.assert_close(parts["loss_first"], first)
    torch.testing.assert_close(parts["loss_second"], second)
    torch.testing.assert_close(total, 0.3 * first + 0.7 * second)
    assert parts["total"] is total


def test_alpha_one_equals_clip_mode():
    out = fake_outputs(seed=2)
    torch.testing.assert_close(DALIPLoss(alpha=1.0)(out)[0], DALIPLoss(mode="clip")(out)[0])


def test_logit_scale_gets_gradient_from_both_terms():
    out = fake_outputs(seed=3)
    scale = torch.tensor(2.0, requires_grad=True)
    out["logit_scale"] = scale.exp()
    DALIPLoss(alpha=0.0)(out)[0].backward()
    assert scale.grad is not None and scale.grad != 0


def test_labels_cached_per_device_and_size():
    loss = DALIPLoss()
    loss(fake_outputs(batch=4))
    loss(fake_outputs(batch=4, seed=5))
    loss(fake_outputs(batch=3))
    assert set(loss._labels) == {(torch.device("cpu"), 4), (torch.device("cpu"), 3)}


def test_bad_arguments():
    with pytest.raises(DalipError):
        DALIPLoss(mode="siglip")
    with pytest.raises(DalipError):
        DALIPLoss(alpha=1.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        full = fake_outputs(batch=4 * world_size, seed=7)
        rows = slice(4 * rank, 4 * (rank + 1))
        results = {}
        for local_loss in (True, False):
            local = {k: (v[rows].clone().requires_grad_(True) if v.dim() == 2 else v) for k, v in full.items()}
            loss = DALIPLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world_size)
            total, _ = loss(local)
            total.backward()
            results[local_loss] = (total.detach(), {k: v.grad for k, v in local.items() if v.dim() == 2})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_matches_full_batch(tmp_path):
    """Two gloo ranks: mean loss and summed feature gradients equal the one-process full batch."""
    world_size = 2
    mp.start_processes(_rank_worker, args=(world_size, _free_port(), str(tmp_path)),
                       nprocs=world_size, start_method="spawn")
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)}
    full = {k: (v.clone().requires_grad_(True) if v.dim() == 2 else v)
            for k, v in fake_outputs(batch=4 * world_size, seed=7).items()}
    expected, _ = DALIPLoss()(full)
    expected.backward()
    for local_loss in (True, False):
        # local loss: each rank's loss covers its own rows, so their mean is the full-batch loss;
        # global loss: every rank computes the full-batch loss.
        losses = torch.stack([results[r][local_loss][0] for r in range(world_size)])
        torch.testing.assert_close(losses.mean(), expected.detach())
        for rank in range(world_size):
            rows = slice(4 * rank, 4 * (rank + 1))
            for key, grad in results[rank][local_loss][1].items():
                # all_gather's backward sums over ranks; DDP then divides by world_size
                torch.testing.assert_close(grad / world_size, full[key].grad[rows], atol=1e-6, rtol=1e-5)
