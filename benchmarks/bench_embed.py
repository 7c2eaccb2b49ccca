"""plantmix's embed stage against bare `clip_retrieval.clip_inference`, same model, same shards, one run.

A stock open_clip architecture with random weights saved locally (nothing downloaded), img2dataset-style
webdataset shards (jpg, txt, json with uid), then in fresh processes, alternating, `--repeats` times:
- plantmix: `plantmix.embed.infer.embed_sources` (clip-retrieval's reader/mapper/writer per tar, markers);
- bare: `clip_inference(input_dataset=<all tars>, input_format="webdataset", enable_metadata=True, ...)`;
- open_clip: the fallback engine (plantmix's Scorer as the mapper), for the cases clip-retrieval cannot run.
Each is timed around the call (imports done before), model loading included. Prints images/s, the
ratios to bare (best run of each), and the largest difference between plantmix's and bare's embeddings.

    python benchmarks/bench_embed.py [--arch ViT-B-32] [--tars 4] [--per-tar 64] [--batch-size 32] [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "bench"


def make_model(out: Path, arch: str) -> str:
    import open_clip
    import safetensors.torch
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    path = out / "open_clip_model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"open_clip:{arch}/{path}"


def make_shards(build: Path, tars: int, per_tar: int, size: int = 256) -> int:
    import webdataset as wds
    from PIL import Image

    out = build / "download" / SOURCE
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for t in range(tars):
        with wds.TarWriter(str(out / f"{t:05d}.tar")) as w:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize((size, size), Image.BILINEAR)  # smooth, photo-sized JPEGs
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                meta = {"key": key, "uid": f"uid-{key}", "status": "success", "caption": f"a photo number {i} of shard {t}"}
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": meta["caption"], "json": json.dumps(meta).encode()})
    return tars * per_tar


def run_one(kind: str, build: Path, model: str, args) -> float:
    """One timed run in this (fresh) process; returns seconds."""
    from plantmix.core.recipe import ScorerConfig

    cfg = ScorerConfig(model=model, batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                       precision="fp32" if args.device == "cpu" else "bf16")  # fmt: skip
    if kind == "bare":
        from clip_retrieval.clip_inference.main import main as clip_inference

        tars = sorted(str(p) for p in (build / "download" / SOURCE).glob("*.tar"))
        t0 = time.perf_counter()
        clip_inference(
            input_dataset="{" + ",".join(tars) + "}", output_folder=str(build / "bare"), input_format="webdataset",
            enable_text=True, enable_image=True, enable_metadata=True, batch_size=args.batch_size,
            num_prepro_workers=args.workers, clip_model=model, use_jit=False,
        )  # fmt: skip
        return time.perf_counter() - t0
    from plantmix.embed.infer import embed_sources

    import clip_retrieval.clip_inference.mapper  # noqa: F401  (imported before the clock, as for bare)

    t0 = time.perf_counter()
    embed_sources(build, [SOURCE], cfg, engine="open_clip" if kind == "open_clip" else None)
    return time.perf_counter() - t0


def child(kind: str, build: Path, model: str, args) -> float:
    cmd = [sys.executable, __file__, "--child", kind, "--dir", str(build), "--model", model,
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{p.stderr[-3000:]}")
    return float(re.findall(r"^RESULT (\S+)$", p.stdout, re.M)[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32", help="stock open_clip architecture (random weights, saved locally)")
    ap.add_argument("--tars", type=int, default=4, help="download tars")
    ap.add_argument("--per-tar", type=int, default=64, help="images per tar")
    ap.add_argument("--batch-size", type=int, default=32, help="inference batch size (both)")
    ap.add_argument("--workers", type=int, default=2, help="image decoding workers (both)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the best counts")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(f"\nRESULT {run_one(args.child, Path(args.dir), args.model, args)}")  # clip_inference prints without newlines
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        model = make_model(tmp / "model", args.arch)
        images = make_shards(tmp / "shards", args.tars, args.per_tar)
        print(f"{args.arch} (random weights), {args.tars} tars x {args.per_tar} images, batch {args.batch_size}, "
              f"{args.workers} decoding workers, {args.device}, {os.cpu_count()} cores")  # fmt: skip
        best: dict[str, float] = {}
        for r in range(args.repeats):
            for kind in ("plantmix", "bare", "open_clip"):
                build = tmp / f"{kind}-{r}"
                build.mkdir()
                os.symlink(tmp / "shards" / "download", build / "download")
                s = child(kind, build, model, args)
                best[kind] = min(best.get(kind, float("inf")), s)
                print(f"  run {r + 1} {kind:<9} {s:7.1f} s  {images / s:7.1f} images/s")
        for kind in ("plantmix", "bare", "open_clip"):
            print(f"{kind:<9} best {best[kind]:7.1f} s  {images / best[kind]:7.1f} images/s")
        print(f"ratio plantmix / bare clip_inference (images/s): {best['bare'] / best['plantmix']:.3f}  (target >= 0.95)")
        print(f"ratio open_clip fallback / bare clip_inference:  {best['bare'] / best['open_clip']:.3f}")
        ours, ours_keys = _read(tmp / "plantmix-0" / "embeddings" / SOURCE)
        bare, bare_keys = _read(tmp / "bare-0" / "bare")
        row = {k: i for i, k in enumerate(bare_keys)}  # bare's one partition interleaves the tars: align by key
        diff = np.abs(ours - bare[[row[k] for k in ours_keys]]).max()
        print(f"rows: plantmix {len(ours)}, bare {len(bare)}; largest |plantmix - bare| image embedding difference: {diff:.2e}")


def _read(folder: Path) -> tuple[np.ndarray, list[str]]:
    import pyarrow.parquet as pq

    image = np.concatenate([np.load(p) for p in sorted((folder / "img_emb").glob("*.npy"))]).astype(np.float32)
    keys = [k for p in sorted((folder / "metadata").glob("*.parquet")) for k in pq.read_table(p)["image_path"].to_pylist()]
    return image, keys


if __name__ == "__main__":
    main()
