"""MBDC forward+backward: dalip.mbdc.MBDC against a transcription of the reference formulation.

The reference style (DESIGN §2.4): an E->E Linear on all channels, then a Python loop over heads,
double centring with (B, d, d) ones/identity matrix products rebuilt every call, the triu index
rebuilt on the CPU every call, BDC in the input dtype. Both run the same math (DESIGN §2.2 order,
same weights, padding mask honoured) on the same inputs; outputs must agree to 1e-4.

    python benchmarks/bench_mbdc.py [--device cuda] [--amp] [--batch 256] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dalip.mbdc import MBDC


def reference_bdc(x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """x: (B, d, M) with masked tokens already zero; count: (B,) valid tokens."""
    batch, dim, _ = x.shape
    eye = torch.eye(dim, dim, device=x.device).view(1, dim, dim).repeat(batch, 1, 1).type(x.dtype)
    ones = torch.ones(batch, dim, dim, device=x.device).type(x.dtype)
    x_pow2 = x.bmm(x.transpose(1, 2))
    dcov = ones.bmm(x_pow2 * eye) + (x_pow2 * eye).bmm(ones) - 2 * x_pow2
    dcov = torch.clamp(dcov, min=0.0)
    dcov = dcov / (2 * count.to(x.dtype)).view(batch, 1, 1)
    dcov = torch.sqrt(dcov + 1e-5)
    d1 = dcov.bmm(ones * 1.0 / dim)
    d2 = (ones * 1.0 / dim).bmm(dcov)
    d3 = (ones * 1.0 / dim).bmm(dcov).bmm(ones * 1.0 / dim)
    return dcov - d1 - d2 + d3


def reference_triu(x: torch.Tensor) -> torch.Tensor:
    batch, dim, _ = x.shape
    index = torch.ones(dim, dim).triu().reshape(dim * dim).nonzero(as_tuple=False).squeeze(1)
    return x.reshape(batch, dim * dim)[:, index]


def reference_forward(module: MBDC, tokens, anchor_index, mask) -> torch.Tensor:
    batch, length, width = tokens.shape
    heads, d = module.heads, module.reduce_dim
    x = F.linear(tokens, module.proj.weight).view(batch, length, heads, width // heads)
    positions = torch.arange(length, device=tokens.device)
    keep = mask & (positions.unsqueeze(0) != anchor_index.unsqueeze(1))
    count = keep.sum(dim=1)
    rows = torch.arange(batch, device=tokens.device)
    outputs = []
    for k in range(heads):
        head = F.linear(x[:, :, k, :], module.reduce.weight)
        head = F.layer_norm(head, (d,), module.norm.weight, module.norm.bias, module.norm.eps)
        head = F.relu(head)
        similarity = F.cosine_similarity(head[rows, anchor_index].unsqueeze(1), head, dim=2)
        weights = F.softmax(similarity.masked_fill(~keep, float("-inf")), dim=1) * count.unsqueeze(1)
        head = head * weights.unsqueeze(2)
        if module.training and module.dropout > 0:
            channel = torch.empty(batch, 1, d, device=head.device, dtype=head.dtype)
            head = head * channel.bernoulli_(1 - module.dropout) / (1 - module.dropout)
        outputs.append(reference_triu(reference_bdc(head.transpose(1, 2), count)))
    z = module.out_norm(torch.cat(outputs, dim=1))
    if module.hidden is not None:
        z = module.hidden(z)
    return F.normalize(module.out_proj(z), dim=-1)


def make_inputs(batch: int, length: int, width: int, text: bool, device: torch.device):
    generator = torch.Generator().manual_seed(length)
    tokens = torch.randn(batch, length, width, generator=generator).to(device)
    if text:  # EOT somewhere in 5..length-1, padding after it
        anchor = torch.randint(5, length, (batch,), generator=generator).to(device)
        mask = torch.arange(length, device=device).unsqueeze(0) <= anchor.unsqueeze(1)
    else:  # CLS first, every patch valid
        anchor = torch.zeros(batch, dtype=torch.long, device=device)
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    return tokens, anchor, mask


def time_steps(fns, module, inputs, grad_out, repeats: int, device: torch.device, amp: bool):
    """Fastest forward+backward (wall, process CPU) seconds of each fn: the runs least disturbed by
    other processes; runs are interleaved so load drifts hit all alike."""
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for i in range(repeats + 1):  # round 0 warms up
        for fn, fn_times in zip(fns, times):
            tokens = inputs[0].detach().requires_grad_(True)
            module.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                z = fn(module, tokens, *inputs[1:])
            (z.float() * grad_out).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                fn_times.append((time.perf_counter() - start, time.process_time() - start_cpu))
    return [(min(w for w, _ in t), min(c for _, c in t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="time under bf16 autocast (equality is checked in fp32)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--reduce-dim", type=int, default=46)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = MBDC(args.embed_dim, heads=args.heads, reduce_dim=args.reduce_dim).to(device)

    print(f"MBDC E={args.embed_dim} h={args.heads} d={args.reduce_dim} B={args.batch} device={device} "
          f"amp={args.amp} threads={torch.get_num_threads()}")
    speedups = []
    for name, length, text in (("vision", 197, False), ("text", 77, True)):
        inputs = make_inputs(args.batch, length, args.embed_dim, text, device)
        module.eval()
        with torch.no_grad():
            diff = (module(*inputs) - reference_forward(module, *inputs)).abs().max().item()
        assert diff < 1e-4, f"{name}: outputs differ by {diff:.2e}"
        module.train()
        grad_out = torch.randn(args.batch, args.embed_dim, device=device)
        ours, ref = time_steps([MBDC.forward, reference_forward], module, inputs, grad_out,
                               args.repeats, device, args.amp)
        speedups += [ref[0] / ours[0], ref[1] / ours[1]]
        print(f"{name:6s} M={length:3d}: max |diff| {diff:.1e}  wall: reference {ref[0] * 1e3:7.0f} ms, "
              f"dalip {ours[0] * 1e3:7.0f} ms, speed-up {ref[0] / ours[0]:.2f}x  "
              f"cpu: reference {ref[1] * 1e3:7.0f} ms, dalip {ours[1] * 1e3:7.0f} ms, speed-up {ref[1] / ours[1]:.2f}x")
    print(f"min speed-up {min(speedups):.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
