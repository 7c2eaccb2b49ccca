"""The one place plantmix extends img2dataset: three subclasses, no copy of its code.

- `GuardedDownloader` (its Downloader): before each shard, routes the downloader module's fetch through
  plantmix.stages.safe_fetch (IRI encoding, host and redirect policy, byte cap, wall-clock deadline)
  in the process that runs the shard.
- `SafeResizer` (its Resizer): before img2dataset's OpenCV decode, reads the image header with PIL
  (lazily: no pixel is decoded) and refuses oversized, tiny or extreme-aspect images from it with
  img2dataset's own messages, so a 100 KB PNG declaring 30000×30000 never allocates its raster. What
  OpenCV would store wrongly is first decoded by PIL into plain 8-bit RGB / RGBA / L and handed on as
  a lossless PNG: 16-bit images (OpenCV's JPEG encoder saturates them to white), palette, LA, CMYK and
  other modes, EXIF-rotated images (OpenCV's unchanged mode ignores the orientation), and formats
  OpenCV cannot read (GIF: the first frame). Everything else goes to OpenCV untouched. It also notes
  the size of the downloaded bytes for the writer.
- `SizeWritingSampleWriter` (its webdataset writer): adds that size as `original_bytes` to the
  sample's meta and parquet row. img2dataset records the original width and height but not the size
  in bytes, which the keep rule needs (bytes per original pixel). The resizer sees the bytes and the
  writer writes the sample right after, in the same thread, so the size travels in a thread-local.
All three are picked by reference when img2dataset ships its downloader to worker processes
(multiprocessing or pyspark), so workers use them too; `install` puts them in place of img2dataset's.
"""

from __future__ import annotations

import functools
import io
import threading

import numpy as np
import pyarrow as pa
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter
from PIL import Image, ImageOps

from plantmix.stages.safe_fetch import FetchPolicy, activate

HOOKS_VERSION = 2  # part of the download fingerprint: bump when what the hooks do changes (2: guards)
# img2dataset's own refusal messages (its Resizer), used for the same refusals made from the header.
TOO_SMALL, AREA_TOO_LARGE, ASPECT_TOO_LARGE = "image too small", "image area too large", "aspect ratio too large"
_OPENCV_FORMATS = ("JPEG", "PNG", "WEBP")  # what OpenCV decodes right in the modes below
_OPENCV_MODES = ("RGB", "RGBA", "L")
_ORIENTATION = 0x0112
_last = threading.local()


def header_refusal(im: Image.Image, min_size: float, max_area: float, max_aspect: float) -> str | None:
    """img2dataset's size checks, on the size the header declares."""
    w, h = im.size
    if min(w, h) < max(min_size, 1):
        return TOO_SMALL
    if w * h > max_area:
        return AREA_TOO_LARGE
    if max(w, h) / min(w, h) > max_aspect:
        return ASPECT_TOO_LARGE
    return None


def _orientation(im: Image.Image) -> int:
    raw = im.info.get("exif")  # from the header; im.getexif() would decode a PNG to look further
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # noqa: BLE001  (a broken EXIF block: the pixels may still be fine)
        return 1
    return int(exif.get(_ORIENTATION) or 1)


def needs_pil(im: Image.Image, head: bytes) -> bool:
    """True when OpenCV would fail on the image or store it wrongly (see the module doc); `head`: the
    file's first 25 bytes at least."""
    if im.format not in _OPENCV_FORMATS or im.mode not in _OPENCV_MODES:
        return True
    if im.format == "PNG" and head[12:16] == b"IHDR" and head[24:25] == b"\x10":
        return True  # 16-bit RGB(A): PIL already shows it as 8-bit RGB(A)
    return _orientation(im) not in (0, 1)


def to_8bit(im: Image.Image) -> Image.Image:
    """The first frame, upright, as 8-bit L, RGB or RGBA (16-bit scaled, not clipped)."""
    im.seek(0)
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range → 8-bit; PIL's convert("L") would clip it to white
        elif im.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in im.info:
        return im.convert("RGBA")
    return im.convert("L" if im.mode in ("L", "1") else "RGB")


def prepare(img_stream: io.BytesIO, min_size: float, max_area: float, max_aspect: float) -> tuple[str | None, io.BytesIO]:
    """(refusal, stream for OpenCV): a header refusal, or the bytes as they are, or an 8-bit PNG of them."""
    head = img_stream.read(25)
    img_stream.seek(0)
    try:
        im = Image.open(img_stream)  # lazy: reads the header only
    except Image.DecompressionBombError:  # PIL will not even say the size: over twice its own pixel limit
        if max_area <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
            return AREA_TOO_LARGE, img_stream
        img_stream.seek(0)  # a cap above PIL's limit: OpenCV decodes and checks, as in bare img2dataset
        return None, img_stream
    except Exception:  # noqa: BLE001  (not an image PIL knows: OpenCV decides, as in bare img2dataset)
        img_stream.seek(0)
        return None, img_stream
    with im:
        refusal = header_refusal(im, min_size, max_area, max_aspect)
        if refusal is not None or not needs_pil(im, head):
            img_stream.seek(0)
            return refusal, img_stream
        try:
            out = io.BytesIO()
            to_8bit(im).save(out, "PNG", compress_level=1)
        except Exception:  # noqa: BLE001  (truncated or corrupt pixels: OpenCV decides and says so)
            img_stream.seek(0)
            return None, img_stream
    out.seek(0)
    return None, out


class SafeResizer(Resizer):
    def __call__(self, img_stream, blurring_bbox_list=None):
        _last.size = img_stream.seek(0, io.SEEK_END)
        img_stream.seek(0)
        refusal, stream = prepare(img_stream, self.min_image_size, self.max_image_area, self.max_aspect_ratio)
        if refusal is not None:
            return None, None, None, None, None, refusal
        return super().__call__(stream, blurring_bbox_list)


class GuardedDownloader(Downloader):
    def __init__(self, *args, fetch_policy: FetchPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetch_policy = fetch_policy

    def download_shard(self, row):
        activate(self.fetch_policy)  # in the worker process that runs this shard
        return super().download_shard(row)


class SizeWritingSampleWriter(WebDatasetSampleWriter):
    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        schema = schema.append(pa.field("original_bytes", pa.int64()))
        super().__init__(shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format)

    def write(self, img_str, key, caption, meta):
        size = getattr(_last, "size", None)
        _last.size = None
        meta["original_bytes"] = size if img_str is not None else None
        super().write(img_str, key, caption, meta)


def install(policy: FetchPolicy) -> None:
    """Make img2dataset's `download` build its downloader with these classes (call before it)."""
    import sys

    import img2dataset  # noqa: F401  (the package's `main` attribute is a function: use the module)

    main = sys.modules["img2dataset.main"]
    main.Resizer = SafeResizer
    main.WebDatasetSampleWriter = SizeWritingSampleWriter
    main.Downloader = functools.partial(GuardedDownloader, fetch_policy=policy)
