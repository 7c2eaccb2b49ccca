"""Training-step time of DALIP against plain CLIP on the same model and batch.

Steps timed (forward + loss + backward + AdamW step, random init, random batch):
  clip         open_clip's own forward of the wrapped model (first-order only) + CLIP loss: the baseline
  dalip        DALIP forward (both towers' MBDC) + DALIP loss (alpha = 0.5)
  dalip-clip   DALIP forward + `--loss clip` (the ablation path: MBDC computed, not trained)
  extra        only the work DALIP adds to a CLIP step: every token through the tower projections,
               both MBDC modules, the second loss term, backward, AdamW on the MBDC weights
Runs are interleaved so that load drifts on a shared machine hit all variants alike. Ratios use each
variant's fastest run (the one least disturbed by other processes), by wall clock and by this
process's CPU time. On a crowded machine whole-step differences of a few percent drown in noise;
(clip + extra) / clip then bounds the overhead more tightly, since only the small term is extra.

    python benchmarks/bench_train_step.py [--model ViT-B-16] [--batch 8] [--threads 2]
    python benchmarks/bench_train_step.py --precision amp_bf16 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dalip.loss import DALIPLoss
from dalip.model import create_model

CAPTION_WORDS = "a photo of the green leaf fern oak rose tulip maple with serrated margin and red flowers".split()


def make_batch(batch: int, image_size: int, tokenizer, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    lengths = torch.randint(3, 15, (batch,), generator=generator).tolist()
    captions = [" ".join(CAPTION_WORDS[(i + j) % len(CAPTION_WORDS)] for j in range(n)) for i, n in enumerate(lengths)]
    return images.to(device), tokenizer(captions).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="open_clip precision: fp32, amp, amp_bf16, bf16, ...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _, _, tokenizer = create_model(args.model, device=device, precision=args.precision)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images, texts = make_batch(args.batch, model.base.visual.image_size[0], tokenizer, device)
    autocast_dtype = torch.bfloat16 if args.precision in ("amp_bf16", "amp_bfloat16") else torch.float16
    use_autocast = args.precision.startswith("amp")
    if not use_autocast and args.precision in ("bf16", "fp16", "pure_bf16", "pure_fp16"):
        images = images.to(torch.bfloat16 if "bf16" in args.precision else torch.float16)
    dalip_loss, clip_loss = DALIPLoss(), DALIPLoss(mode="clip")

    def clip_outputs(images, texts):
        image_features, text_features, logit_scale = model.base(images, texts)[:3]
        return {"image_features": image_features, "text_features": text_features, "logit_scale": logit_scale}

    def full_step(forward, loss):
        def run():
            total, _ = loss(forward(images, texts))
            return total, optimizer
        return run

    # Stand-ins for the towers' last hidden states (after ln_post / ln_final): the extra work costs
    # the same whatever their values.
    visual = model.base.visual
    text_proj = (model.base.text if hasattr(model.base, "text") else model.base).text_projection
    text_width = text_proj.in_features if isinstance(text_proj, torch.nn.Linear) else text_proj.shape[0]
    _, _, eot, valid = model.text_tokens(texts)
    tokens_image = torch.randn(args.batch, visual.positional_embedding.shape[0], visual.proj.shape[0],
                               device=device, requires_grad=True)
    tokens_text = torch.randn(args.batch, texts.shape[1], text_width, device=device, requires_grad=True)
    cls = torch.zeros(args.batch, dtype=torch.long, device=device)
    every = torch.ones(tokens_image.shape[:2], dtype=torch.bool, device=device)
    mbdc_optimizer = torch.optim.AdamW([*model.mbdc_image.parameters(), *model.mbdc_text.parameters()], lr=1e-5)
    second_term = DALIPLoss(alpha=0.0)

    def extra_step():
        tokens_image.grad = tokens_text.grad = None
        projected_text = text_proj(tokens_text) if isinstance(text_proj, torch.nn.Linear) else tokens_text @ text_proj
        z_image = model.mbdc_image(tokens_image @ visual.proj, cls, every)
        z_text = model.mbdc_text(projected_text, eot, valid)
        first = torch.zeros_like(z_image)  # the first-order term is the baseline's work, not extra
        total, _ = second_term({"image_features": first, "text_features": first, "image_features_2": z_image,
                                "text_features_2": z_text, "logit_scale": model.base.logit_scale.exp()})
        return total, mbdc_optimizer

    variants = {"clip": full_step(clip_outputs, clip_loss), "dalip": full_step(model, dalip_loss),
                "dalip-clip": full_step(model, clip_loss), "extra": extra_step}

    def step(run) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            total, step_optimizer = run()
        total.backward()
        step_optimizer.step()
        step_optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - start_cpu

    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.repeats + 1):  # round 0 warms up
        for name, run in variants.items():
            seconds, cpu_seconds = step(run)
            if i:
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)
    best = {name: min(t) for name, t in times.items()}
    best_cpu = {name: min(t) for name, t in cpu_times.items()}

    print(f"{args.model} batch={args.batch} device={device} precision={args.precision} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:10s} wall best {seconds:7.2f} s  median {statistics.median(times[name]):7.2f} s   "
              f"cpu best {best_cpu[name]:7.2f} s  median {statistics.median(cpu_times[name]):7.2f} s")
    for name in ("dalip", "dalip-clip"):
        target = " (target <= 1.10x)" if name == "dalip" else ""
        print(f"  {name} / clip: wall {best[name] / best['clip']:.3f}x, cpu {best_cpu[name] / best_cpu['clip']:.3f}x{target}")
    print(f"  (clip + extra) / clip: wall {1 + best['extra'] / best['clip']:.3f}x, "
          f"cpu {1 + best_cpu['extra'] / best_cpu['clip']:.3f}x (target <= 1.10x)")


if __name__ == "__main__":
    main()
