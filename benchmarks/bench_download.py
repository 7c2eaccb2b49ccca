"""plantmix's download stage vs a bare img2dataset call on the same demo URL list, in one run.

Serves the demo world on loopback, takes its fault-free rows (timeouts would measure the server's
sleep, not the downloader), and downloads them twice with identical img2dataset settings: once through
`plantmix.download.download_source` (child process, progress polling, fingerprinting, summary) and once
with `img2dataset.download` called directly. Prints images/s for both and the ratio (target ≥ 0.95).
Then the per-image cost of plantmix's guards alone (plantmix.stages.i2d_hooks / safe_fetch: fetch
through the guarded urlopen, header check before the decode), against img2dataset's own fetch and
resize on the same URLs, in one thread, interleaved, as CPU time of that thread (the server's threads
and other processes on the machine left out): a figure start-up and load noise cannot blur.

    python benchmarks/bench_download.py [--species 24] [--images 40] [--repeats 2] [--per-image 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from plantmix.demo import DEMO_BASE_URL  # noqa: E402
from plantmix.demo.server import serve_world  # noqa: E402
from plantmix.demo.world import generate_world  # noqa: E402
from plantmix.stages.download import _img2dataset_args, download_source, fetch_policy, fetch_urls  # noqa: E402
from plantmix.stages.ingest import make_uid  # noqa: E402
from plantmix.core.recipe import DemoWorldConfig, DownloadConfig  # noqa: E402


def clean_rows(world: Path) -> pa.Table:
    truth = pq.read_table(world / "ground_truth.parquet")
    ok_urls = set(truth.filter(pc.equal(truth["fault"], "ok"))["url"].to_pylist())
    tables = [pq.read_table(world / f"{name}_urls.parquet") for name in ("plant", "general")]
    rows = [r for t in tables for r in t.select(["url", "caption"]).to_pylist() if r["url"] in ok_urls]
    return pa.table(
        {
            "uid": [make_uid("bench", url=r["url"]) for r in rows],
            "url": [r["url"] for r in rows],
            "path": pa.nulls(len(rows), pa.string()),
            "caption": [r["caption"] for r in rows],
        }
    )


def per_image_ms(urls: list[str], cfg: DownloadConfig, rewrite: dict[str, str], rounds: int = 3) -> dict[str, float]:
    """CPU ms per image of fetch + resize in this thread: img2dataset's own classes vs plantmix's hooks."""
    import urllib.request

    from img2dataset import downloader
    from img2dataset.resizer import Resizer

    from plantmix.stages.i2d_hooks import SafeResizer
    from plantmix.stages.safe_fetch import activate

    kw = dict(image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
              encode_format=cfg.encode_format, max_image_area=cfg.max_image_area)  # fmt: skip
    bare_fetch, bare_resize, safe_resize = downloader.download_image_with_retry, Resizer(**kw), SafeResizer(**kw)
    activate(fetch_policy(cfg, rewrite))
    safe_fetch, shim = downloader.download_image_with_retry, downloader.urllib
    ways = {"img2dataset": (urllib, bare_fetch, bare_resize), "plantmix": (shim, safe_fetch, safe_resize)}
    seconds = dict.fromkeys(ways, 0.0)
    try:
        for _ in range(rounds):
            for name, (module, fetch, resize) in ways.items():
                downloader.urllib = module
                t0 = time.thread_time()
                for url in urls:
                    _, stream, err = fetch((0, url), cfg.timeout, 0, cfg.user_agent_token, None)
                    assert err is None, err
                    resize(stream)
                seconds[name] += time.thread_time() - t0
    finally:
        downloader.urllib, downloader.download_image_with_retry = urllib, bare_fetch
    return {name: 1e3 * s / (rounds * len(urls)) for name, s in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--species", type=int, default=24)
    ap.add_argument("--images", type=int, default=40, help="images per species")
    ap.add_argument("--general", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-image", type=int, default=300, help="URLs in the per-image guard cost (0: skip)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_download_"))
    try:
        world = generate_world(
            tmp / "world", DemoWorldConfig(species=args.species, images_per_species=args.images, general_images=args.general)
        )
        rows = clean_rows(world)
        cfg = DownloadConfig(processes_count=2, thread_count=16, number_sample_per_shard=500, timeout=5, image_size=256)
        print(f"{rows.num_rows} fault-free URLs, img2dataset settings: processes=2 threads=16 shard=500 size=256")
        times: dict[str, list[float]] = {"plantmix": [], "img2dataset": []}
        with serve_world(world) as base:
            rewrite = {DEMO_BASE_URL: base}
            bare_input = tmp / "bare_input.parquet"
            pq.write_table(pa.table({"url": fetch_urls(rows, rewrite), "caption": rows["caption"], "uid": rows["uid"]}), bare_input)
            from img2dataset import download

            for rep in range(args.repeats):
                out = tmp / f"plantmix_{rep}"
                t0 = time.perf_counter()
                download_source(rows, out, cfg, rewrite)
                times["plantmix"].append(time.perf_counter() - t0)

                out = tmp / f"bare_{rep}"
                bare_args = dict(_img2dataset_args(cfg), url_list=str(bare_input), output_folder=str(out))
                t0 = time.perf_counter()
                download(**bare_args)
                times["img2dataset"].append(time.perf_counter() - t0)
            if args.per_image:
                cost = per_image_ms(fetch_urls(rows, rewrite).to_pylist()[: args.per_image], cfg, rewrite)
        best = {k: min(v) for k, v in times.items()}
        rate = {k: rows.num_rows / v for k, v in best.items()}
        print(f"plantmix    : best {best['plantmix']:.2f} s  → {rate['plantmix']:.1f} images/s  (runs: {times['plantmix']})")
        print(f"img2dataset : best {best['img2dataset']:.2f} s  → {rate['img2dataset']:.1f} images/s  (runs: {times['img2dataset']})")
        print(f"ratio plantmix / bare = {rate['plantmix'] / rate['img2dataset']:.3f}  (target ≥ 0.95)")
        if args.per_image:
            print(f"CPU per image, one thread: img2dataset fetch+resize {cost['img2dataset']:.3f} ms, with plantmix's "
                  f"guards {cost['plantmix']:.3f} ms → ratio {cost['img2dataset'] / cost['plantmix']:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
