"""Hostile downloads, each against a real loopback server (plantmix.demo.server) and real files, through
a real build: every case ends with its documented status and error line, and every input row is in
the manifest. Plus content-aware skipping: edited local images, a replaced webdataset tar, and
damaged download shards are redone, and nothing else is."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageOps

from plantmix.build import run_build
from plantmix.core.recipe import DownloadConfig, Recipe
from plantmix.core.schema import (
    DROP_DOWNLOAD_FAILED,
    ERROR_DEADLINE_EXCEEDED,
    ERROR_HOST_REFUSED,
    ERROR_REDIRECT_REFUSED,
    ERROR_RESPONSE_TOO_LARGE,
)
from plantmix.demo.server import serve_world
from plantmix.demo.world import _flat_png
from plantmix.stages.download import fetch_policy
from plantmix.stages.i2d_hooks import AREA_TOO_LARGE
from plantmix.stages.safe_fetch import FetchPolicy, iri_to_uri, non_public_kind

TWO_GB = 2 * 1024**3
GRADIENT = np.add.outer(np.arange(64), np.arange(96)).astype(np.float64) * 255 / 158  # smooth: JPEG keeps its std


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg(size=(96, 64), seed=0) -> bytes:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 60 + GRADIENT[: size[1], : size[0], None] * 0.7)
    return _save(Image.fromarray(arr.clip(0, 255).astype(np.uint8)), "JPEG", quality=95)


def _gray16() -> tuple[bytes, np.ndarray]:
    arr16 = np.rint(GRADIENT * 257).astype(np.uint16)
    return _save(Image.fromarray(arr16), "PNG"), (arr16 >> 8).astype(np.uint8)


def _rgb16() -> tuple[bytes, np.ndarray]:
    import cv2  # PIL writes no 16-bit RGB PNG

    arr16 = np.rint(np.dstack([GRADIENT, GRADIENT[::-1], 255 - GRADIENT]) * 257).astype(np.uint16)
    return cv2.imencode(".png", arr16[..., ::-1])[1].tobytes(), (arr16 >> 8).astype(np.uint8)


def _exif_rotated() -> bytes:
    im = Image.fromarray(np.dstack([GRADIENT, GRADIENT * 0.5, 255 - GRADIENT]).astype(np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90° clockwise
    return _save(im, "JPEG", quality=95, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (60, 40), c) for c in ((200, 30, 30), (30, 200, 30))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _image_route(name: str, ctype: str, **more) -> dict:
    return {"status": 200, "content_type": ctype, "headers": {}, "delay": 0.0, "body_file": name, **more}


def _redirect(location: str) -> dict:
    return {"status": 302, "content_type": "text/plain", "headers": {"Location": location}, "delay": 0.0, "body": ""}


def write_site(root: Path, files: dict[str, bytes], routes: dict[str, dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "routes.json").write_text(json.dumps({"routes": routes}))
    return root


@pytest.fixture(scope="module")
def other_server(tmp_path_factory):
    """A second loopback server, on another port, that would serve a good image."""
    root = write_site(tmp_path_factory.mktemp("other"), {"ok.jpg": _jpeg()}, {"/ok.jpg": _image_route("ok.jpg", "image/jpeg")})
    with serve_world(root) as base:
        yield base


# path on the main server -> (expected status, error prefix or None)
CASES = {
    "/ok.jpg": ("success", None),
    "/bomb.png": ("failed_to_resize", AREA_TOO_LARGE),
    "/two-gb.bin": ("failed_to_download", ERROR_RESPONSE_TOO_LARGE),
    "/two-gb-stream.bin": ("failed_to_download", ERROR_RESPONSE_TOO_LARGE),
    "/drip.jpg": ("failed_to_download", ERROR_DEADLINE_EXCEEDED),
    "/redirect-same.jpg": ("success", None),
    "/redirect-port.jpg": ("failed_to_download", ERROR_HOST_REFUSED),
    "/redirect-ftp.jpg": ("failed_to_download", ERROR_REDIRECT_REFUSED),
    "/redirect-file.jpg": ("failed_to_download", ERROR_REDIRECT_REFUSED),
    "/gray16.png": ("success", None),
    "/rgb16.png": ("success", None),
    "/palette.png": ("success", None),
    "/la.png": ("success", None),
    "/cmyk.jpg": ("success", None),
    "/exif.jpg": ("success", None),
    "/anim.gif": ("success", None),
    "/caf%C3%A9%20leaf%20%231.jpg": ("success", None),  # requested as "café leaf #1.jpg" (an IRI)
}
IRI_PATH = "/café leaf %231.jpg"


@pytest.fixture(scope="module")
def site(tmp_path_factory, other_server):
    gray_png, gray8 = _gray16()
    rgb_png, rgb8 = _rgb16()
    base_rgb = Image.fromarray(np.dstack([GRADIENT, GRADIENT[::-1], 255 - GRADIENT]).astype(np.uint8))
    files = {
        "ok.jpg": _jpeg(), "bomb.png": _flat_png(30000, 30000, (0, 100)), "gray16.png": gray_png, "rgb16.png": rgb_png,
        "palette.png": _save(base_rgb.quantize(64, dither=Image.Dither.NONE), "PNG"), "la.png": _save(base_rgb.convert("LA"), "PNG"),
        "cmyk.jpg": _save(base_rgb.convert("CMYK"), "JPEG", quality=95), "exif.jpg": _exif_rotated(),
        "anim.gif": _animated_gif(), "drip.jpg": _jpeg(seed=1),
    }  # fmt: skip
    routes = {
        "/ok.jpg": _image_route("ok.jpg", "image/jpeg"),
        "/bomb.png": _image_route("bomb.png", "image/png"),
        "/two-gb.bin": _image_route("", "image/jpeg", body_size=TWO_GB),
        "/two-gb-stream.bin": _image_route("", "image/jpeg", body_size=TWO_GB, no_length=True),
        "/drip.jpg": _image_route("drip.jpg", "image/jpeg", drip=0.2),
        "/redirect-same.jpg": _redirect("/ok.jpg"),
        "/redirect-port.jpg": _redirect(other_server + "/ok.jpg"),
        "/redirect-ftp.jpg": _redirect("ftp://127.0.0.1:2121/ok.jpg"),
        "/redirect-file.jpg": _redirect("file:///etc/hostname"),
        "/caf%C3%A9%20leaf%20%231.jpg": _image_route("ok.jpg", "image/jpeg"),
        **{f"/{n}": _image_route(n, "image/png" if n.endswith("png") else "image/jpeg")
           for n in ("gray16.png", "rgb16.png", "palette.png", "la.png", "cmyk.jpg", "exif.jpg", "anim.gif")},
    }  # fmt: skip
    root = write_site(tmp_path_factory.mktemp("site"), files, routes)
    return root, {"gray8": gray8, "rgb8": rgb8, "base_rgb": np.asarray(base_rgb)}


def _recipe(tmp: Path, urls: list[str], **download) -> Recipe:
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo number {i}" for i in range(len(urls))]}), tmp / "urls.parquet")
    return Recipe.model_validate({
        "name": "hostile", "sources": [{"name": "web", "domain": "general", "format": "url_list",
                                        "path": str(tmp / "urls.parquet")}],
        "download": {"processes_count": 1, "thread_count": 32, "number_sample_per_shard": 100, **download},
    })  # fmt: skip


def _stored(build: Path, row: dict) -> np.ndarray:
    with tarfile.open(build / row["shard"]) as tar:
        data = tar.extractfile(f"{row['key']}.jpg").read()
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def hostile_build(site, tmp_path_factory):
    root, _ = site
    tmp = tmp_path_factory.mktemp("hostile")
    with serve_world(root) as base:
        host = base.removeprefix("http://")
        urls = [base + (IRI_PATH if "caf" in path else path) for path in CASES]
        recipe = _recipe(tmp, urls, timeout=1, deadline=4, allowed_hosts=[host])
        t0 = time.perf_counter()
        run_build(recipe, tmp / "build")
        seconds = time.perf_counter() - t0
    manifest = pq.read_table(tmp / "build" / "manifest.parquet").to_pylist()
    return tmp / "build", {r["url"].removeprefix(base): r for r in manifest}, seconds


@pytest.mark.slow  # a build (~30 s here)
def test_every_hostile_case_ends_with_its_status_and_error(hostile_build):
    _, rows, _ = hostile_build
    assert len(rows) == len(CASES)  # every input row is in the manifest
    for path, (status, error) in CASES.items():
        row = rows[IRI_PATH if "caf" in path else path]
        assert row["status"] == status, (path, row["status"], row["error_message"])
        if error is None:
            assert row["error_message"] is None and row["sha256"], (path, row["error_message"])
        else:
            assert row["error_message"].startswith(error), (path, row["error_message"])
            assert row["keep"] is False and row["drop_reason"] == DROP_DOWNLOAD_FAILED, path
    # the slow-drip server (~400 s of body) was cut at the deadline, not waited for
    assert rows["/drip.jpg"]["error_message"] == f"{ERROR_DEADLINE_EXCEEDED}: not finished after 4 s (download.deadline)"
    assert "(download.max_bytes)" in rows["/two-gb.bin"]["error_message"]
    assert "Content-Length" in rows["/two-gb.bin"]["error_message"]  # refused from the header
    assert "Content-Length" not in rows["/two-gb-stream.bin"]["error_message"]  # refused while streaming


@pytest.mark.slow  # a build (~30 s here)
def test_the_build_was_not_held_by_the_drip_or_the_big_bodies(hostile_build):
    _, _, seconds = hostile_build
    assert seconds < 120


@pytest.mark.slow  # a build (~30 s here)
def test_redirects_to_other_ports_and_schemes_are_refused_before_connecting(hostile_build, other_server):
    _, rows, _ = hostile_build
    port = other_server.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port} is a loopback address" in rows["/redirect-port.jpg"]["error_message"]
    assert "'ftp'" in rows["/redirect-ftp.jpg"]["error_message"]
    assert "'file'" in rows["/redirect-file.jpg"]["error_message"]
    assert rows["/redirect-same.jpg"]["sha256"] == rows["/ok.jpg"]["sha256"]  # a redirect on the allowed host


@pytest.mark.slow  # a build (~30 s here)
def test_sixteen_bit_pngs_keep_their_content(hostile_build, site):
    build, rows, _ = hostile_build
    views = site[1]
    for path, view in (("/gray16.png", views["gray8"]), ("/rgb16.png", views["rgb8"])):
        stored = _stored(build, rows[path]).astype(np.float64)
        assert stored.shape[:2] == view.shape[:2]
        assert abs(stored.std() - view.std()) <= 0.05 * view.std(), (path, stored.std(), view.std())
        assert np.abs(stored.mean() - view.mean()) < 3


@pytest.mark.slow  # a build (~30 s here)
def test_palette_la_and_cmyk_are_converted(hostile_build, site):
    """Stored as the file shows (PIL's view of its own file), not as OpenCV's unchanged decode has it."""
    build, rows, _ = hostile_build
    for name, mode in (("palette.png", "RGB"), ("cmyk.jpg", "RGB"), ("la.png", "L")):
        want = np.asarray(Image.open(site[0] / name).convert(mode)).astype(np.float64)
        stored = _stored(build, rows[f"/{name}"]).astype(np.float64)
        if mode == "L":
            stored = stored.mean(axis=2)
        assert stored.shape == want.shape, name
        assert np.abs(stored - want).mean() < 4, (name, np.abs(stored - want).mean())


@pytest.mark.slow  # a build (~30 s here)
def test_exif_rotated_jpeg_is_stored_upright(hostile_build, site):
    build, rows, _ = hostile_build
    row = rows["/exif.jpg"]
    upright = np.asarray(ImageOps.exif_transpose(Image.open(site[0] / "exif.jpg"))).astype(np.float64)
    stored = _stored(build, row).astype(np.float64)
    assert stored.shape == upright.shape == (96, 64, 3)
    assert (row["width"], row["height"]) == (64, 96)
    assert np.abs(stored - upright).mean() < 4


@pytest.mark.slow  # a build (~30 s here)
def test_gif_stores_its_first_frame(hostile_build):
    build, rows, _ = hostile_build
    stored = _stored(build, rows["/anim.gif"]).astype(np.float64)
    assert stored.shape == (40, 60, 3)
    assert np.abs(stored.mean(axis=(0, 1)) - [200, 30, 30]).max() < 8


@pytest.mark.slow  # a build (~30 s here)
def test_iri_is_fetched_and_the_manifest_keeps_it_as_given(hostile_build):
    _, rows, _ = hostile_build
    row = rows[IRI_PATH]
    assert row["status"] == "success" and row["sha256"] == rows["/ok.jpg"]["sha256"]


def test_iri_to_uri_encodes_what_a_request_line_cannot_carry():
    assert iri_to_uri("http://bücher.example/a b/é?q=ü ü#frag") == "http://xn--bcher-kva.example/a%20b/%C3%A9?q=%C3%BC%20%C3%BC"
    assert iri_to_uri("http://example.org/already%20encoded?a=1&b=%2F") == "http://example.org/already%20encoded?a=1&b=%2F"


def test_the_demo_servers_address_is_the_only_loopback_exception():
    cfg = DownloadConfig()
    policy = fetch_policy(cfg, {"https://demo.plantmix.example": "http://127.0.0.1:4321"})
    assert policy.host_allowed("127.0.0.1", 4321)
    assert not policy.host_allowed("127.0.0.1", 4322) and not policy.host_allowed("localhost", 4321)
    assert not fetch_policy(cfg).host_allowed("127.0.0.1", 4321)
    assert fetch_policy(DownloadConfig(allow_private_hosts=True)).host_allowed("10.0.0.1", 80)
    assert FetchPolicy.parse_hosts(["Mirror.LAN", "[::1]:8080"]) == {("mirror.lan", None), ("::1", 8080)}
    kinds = {ip: non_public_kind(ip) for ip in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:192.168.0.1",
                                                "0.0.0.0", "93.184.216.34", "2606:4700::1111")}  # fmt: skip
    assert kinds == {"127.0.0.1": "loopback", "10.1.2.3": "private", "169.254.169.254": "link-local", "::1": "loopback",
                     "::ffff:192.168.0.1": "private", "0.0.0.0": "private", "93.184.216.34": None,
                     "2606:4700::1111": None}  # fmt: skip


def test_a_bad_allowed_host_is_one_clear_error(tmp_path):
    from plantmix.core.errors import PlantmixError
    from plantmix.core.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "sources": [{"name": "s", "domain": "plant", "format": "url_list",
                                    "path": "x.csv"}], "download": {"allowed_hosts": [":80"]}}))  # fmt: skip
    with pytest.raises(PlantmixError, match=r"field 'download.allowed_hosts': not a host: ':80'"):
        load_recipe(path)


@pytest.mark.slow  # two Spark sessions and a download (~50 s here)
def test_the_guards_hold_under_the_pyspark_distributor(site, tmp_path):
    """Run as in a process that used Spark before (the embed stage, an earlier test): the forked
    download child starts a JVM of its own and leaves the parent's session working."""
    from pyspark.sql import SparkSession

    ours = SparkSession.getActiveSession() is None
    parent = SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false").getOrCreate()
    try:
        _download_under_spark(site, tmp_path, parent, parent.sparkContext.applicationId)
    finally:
        if ours:  # later tests start sessions with settings of their own
            parent.stop()


def _download_under_spark(site, tmp_path, parent, parent_app):
    from plantmix.stages.download import download_source

    root, _ = site
    paths = ["/ok.jpg", "/bomb.png", "/two-gb-stream.bin", "/redirect-port.jpg", "/gray16.png"]
    with serve_world(root) as base:
        rows = pa.table({"uid": [str(i) for i in range(len(paths))], "url": [base + p for p in paths],
                         "path": pa.nulls(len(paths), pa.string()), "caption": ["a photo"] * len(paths)})  # fmt: skip
        cfg = DownloadConfig(distributor="pyspark", processes_count=1, thread_count=8, timeout=2,
                             allowed_hosts=[base.removeprefix("http://")])  # fmt: skip
        download_source(rows, tmp_path / "out", cfg)
    got = {r["uid"]: r for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()}
    for i, path in enumerate(paths):
        status, error = CASES[path]
        assert got[str(i)]["status"] == status and (got[str(i)]["error_message"] or "").startswith(error or ""), path
    assert got["4"]["original_bytes"] == (root / "gray16.png").stat().st_size  # the writer hook too
    sessions = re.findall(r"^Spark \S+ session (\S+) \(master local\[1\], pid (\d+)\)$", (tmp_path / "out.log").read_text(), re.M)
    assert len(sessions) == 1 and sessions[0][0] != parent_app and int(sessions[0][1]) != os.getpid(), sessions
    assert parent.range(3).count() == 3  # the parent's gateway was not touched by the child


def test_a_server_dripping_its_headers_is_stopped_at_the_deadline(monkeypatch):
    """The deadline holds before any body: the watchdog shuts the socket a header read is blocked on."""
    import socket
    import threading

    from img2dataset import downloader

    from plantmix.stages.safe_fetch import activate

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\n")
        for byte in b"X-Slow: " + b"a" * 10_000:  # one header byte every 0.2 s: ~30 min of headers
            if stop.wait(0.2):
                break
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    for name in ("urllib", "download_image_with_retry"):  # restored after the test
        monkeypatch.setattr(downloader, name, getattr(downloader, name))
    activate(FetchPolicy(deadline=1.5, allowed_hosts=FetchPolicy.parse_hosts([f"127.0.0.1:{port}"])))
    t0 = time.perf_counter()
    _, stream, err = downloader.download_image_with_retry((0, f"http://127.0.0.1:{port}/x.jpg"), 1, 2, None, None)
    seconds = time.perf_counter() - t0
    stop.set()
    listener.close()
    assert stream is None and err == f"{ERROR_DEADLINE_EXCEEDED}: not finished after 1.5 s (download.deadline)"
    assert seconds < 2.5


def test_header_checks_refuse_before_decoding_and_defer_to_opencv_above_pils_limit():
    from plantmix.stages.i2d_hooks import TOO_SMALL, prepare

    bomb = _flat_png(30000, 30000, (0, 100))
    assert prepare(io.BytesIO(bomb), 0, 64e6, float("inf"))[0] == AREA_TOO_LARGE
    assert prepare(io.BytesIO(_flat_png(20000, 5000, (0, 10))), 0, 64e6, float("inf"))[0] == AREA_TOO_LARGE
    assert prepare(io.BytesIO(_jpeg(size=(40, 20))), 32, 64e6, float("inf"))[0] == TOO_SMALL
    refusal, stream = prepare(io.BytesIO(bomb), 0, 1e10, float("inf"))  # a cap above PIL's: OpenCV decides
    assert refusal is None and stream.read() == bomb
    ok = _jpeg()
    refusal, stream = prepare(io.BytesIO(ok), 0, 64e6, float("inf"))
    assert refusal is None and stream.read() == ok  # a plain 8-bit JPEG goes to OpenCV untouched


# ---- memory: the decompression bomb is refused from its header -----------------------------------

_PEAK = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 0))
"""


def _peak_rss_kib(recipe: Path, out: Path) -> int:
    """Peak RSS (KiB) of the largest process of a `plantmix build`, its img2dataset workers included."""
    cmd = [sys.executable, "-c", _PEAK, sys.executable, "-m", "plantmix.cli", "build", str(recipe), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split()[-1])


@pytest.mark.slow
def test_decompression_bomb_costs_no_more_memory_than_a_normal_image(site, tmp_path):
    root, _ = site
    with serve_world(root) as base:
        peaks = {}
        for name in ("ok.jpg", "bomb.png"):
            tmp = tmp_path / name
            tmp.mkdir()
            recipe = _recipe(tmp, [f"{base}/{name}"], allowed_hosts=[base.removeprefix("http://")])
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
            peaks[name] = _peak_rss_kib(tmp / "recipe.yaml", tmp / "build")
        manifest = pq.read_table(tmp_path / "bomb.png" / "build" / "manifest.parquet").to_pylist()
    assert [(r["status"], r["error_message"]) for r in manifest] == [("failed_to_resize", AREA_TOO_LARGE)]
    assert peaks["bomb.png"] - peaks["ok.jpg"] < 100 * 1024, peaks  # 30000x30000 decoded would be ~900 MB


# ---- content-aware skipping ---------------------------------------------------------------------


def _write_tar(path: Path, images: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data in images.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", f"a photo of sample {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _local_recipe(tmp: Path) -> Recipe:
    return Recipe.model_validate({
        "name": "local", "sources": [
            {"name": "folder", "domain": "plant", "format": "image_folder", "path": str(tmp / "folder")},
            {"name": "wds", "domain": "general", "format": "webdataset", "path": str(tmp / "wds.tar")},
        ],
        "download": {"processes_count": 1, "thread_count": 4, "number_sample_per_shard": 3},
    })  # fmt: skip


def _tars(build: Path) -> dict[str, int]:
    return {str(p.relative_to(build)): p.stat().st_mtime_ns for p in sorted(build.glob("download/*/*.tar"))}


def _sha(build: Path) -> dict[str, str]:
    return {r["path"] or r["url"]: r["sha256"] for r in pq.read_table(build / "manifest.parquet").to_pylist()}


@pytest.mark.slow  # a build (~30 s here)
def _local_build(tmp: Path, species: str, seed: int, tar_images: int) -> tuple[Path, Path, Recipe]:
    """An image folder of 7 images (3 shards of 3) and a webdataset tar, built: (folder, build, recipe)."""
    folder = tmp / "folder" / species
    folder.mkdir(parents=True)
    for i in range(7):
        (folder / f"{i}.jpg").write_bytes(_jpeg(seed=seed + i))
    _write_tar(tmp / "wds.tar", {f"s{i}": _jpeg(seed=seed + 20 + i) for i in range(tar_images)})
    recipe = _local_recipe(tmp)
    run_build(recipe, tmp / "build")
    return folder, tmp / "build", recipe


@pytest.mark.slow  # two builds (~60 s here)
def test_edited_local_images_and_a_replaced_tar_redo_only_their_shards(tmp_path):
    folder, build, recipe = _local_build(tmp_path, "quercus_robur", 10, tar_images=5)
    before_tars, before_sha = _tars(build), _sha(build)
    assert len(before_tars) == 3 + 2 and len(before_sha) == 12

    edited = _jpeg(seed=99)
    (folder / "4.jpg").write_bytes(edited)  # in place: same path, new bytes
    _write_tar(tmp_path / "wds.tar", {f"s{i}": _jpeg(seed=30 + i if i != 1 else 98) for i in range(5)})  # s1 changed
    run_build(recipe, build)
    after_tars, after_sha = _tars(build), _sha(build)

    changed_rows = {p for p in after_sha if after_sha[p] != before_sha[p]}
    assert changed_rows == {str((folder / "4.jpg").resolve()), next(p for p in after_sha if "-000001-s1." in p)}
    assert after_sha[str((folder / "4.jpg").resolve())] == hashlib.sha256(edited).hexdigest()
    redone = {t for t in after_tars if after_tars[t] != before_tars[t]}
    assert len(redone) == 2 and any(t.startswith("download/folder/") for t in redone) and any(
        t.startswith("download/wds/") for t in redone), redone  # one shard of each source, not all five


@pytest.mark.slow  # three builds (~90 s here)
def test_damaged_download_shards_are_redone_not_trusted(tmp_path):
    _, build, recipe = _local_build(tmp_path, "acer_campestre", 50, tar_images=2)
    manifest = pq.read_table(build / "manifest.parquet").select(["uid", "sha256", "status"])
    dl = build / "download" / "folder"

    # A finished download whose files changed afterwards: a truncated tar, a garbled parquet.
    tar = dl / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    (dl / "00001.parquet").write_bytes(b"not a parquet file")
    run_build(recipe, build)
    assert pq.read_table(build / "manifest.parquet").select(["uid", "sha256", "status"]).equals(manifest)
    with tarfile.open(tar) as t:
        assert len([m for m in t if m.name.endswith(".jpg")]) == 3

    # A run killed after img2dataset finished but before the marker: what it leaves is its start record
    # and no marker. Shards img2dataset counts as done are then read back before they are kept.
    done = build / "download" / "folder.done.json"
    record = json.loads(done.read_text())
    started = {"key": record["key"], "settings": record["settings"], "shards": record["shards"], "pgid": None}
    (build / "download" / "folder.started.json").write_text(json.dumps(started))
    done.unlink()
    untouched = (dl / "00002.tar").stat().st_mtime_ns
    tar.write_bytes(tar.read_bytes()[:1500])
    run_build(recipe, build)
    assert pq.read_table(build / "manifest.parquet").select(["uid", "sha256", "status"]).equals(manifest)
    assert (dl / "00002.tar").stat().st_mtime_ns == untouched
