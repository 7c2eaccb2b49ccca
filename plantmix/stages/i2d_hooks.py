"""The one place plantmix extends img2dataset: its resizer and its webdataset writer, by subclassing.

img2dataset records the original width and height of a download but not its size in bytes, which
the keep rule needs (bytes per original pixel: a re-encode or an edited copy is lighter than the
file it came from; the stored image, re-encoded by img2dataset, cannot tell). The resizer sees the
downloaded bytes and the writer writes the sample right after, in the same thread, so the resizer
notes the size in a thread-local and the writer adds it as `original_bytes` to the sample's meta
and parquet row. Both classes are picked by reference when img2dataset ships its downloader to
worker processes (multiprocessing or pyspark), so workers use them too.
"""

from __future__ import annotations

import io
import threading

import pyarrow as pa
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter

HOOKS_VERSION = 1  # part of the download fingerprint: bump when what the hooks record changes
_last = threading.local()


class SizeNotingResizer(Resizer):
    def __call__(self, img_stream, blurring_bbox_list=None):
        _last.size = img_stream.seek(0, io.SEEK_END)
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


class SizeWritingSampleWriter(WebDatasetSampleWriter):
    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        schema = schema.append(pa.field("original_bytes", pa.int64()))
        super().__init__(shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format)

    def write(self, img_str, key, caption, meta):
        size = getattr(_last, "size", None)
        _last.size = None
        meta["original_bytes"] = size if img_str is not None else None
        super().write(img_str, key, caption, meta)


def install() -> None:
    """Make img2dataset's `download` build its downloader with these classes (call before it)."""
    import sys

    import img2dataset  # noqa: F401  (the package's `main` attribute is a function: use the module)

    main = sys.modules["img2dataset.main"]
    main.Resizer = SizeNotingResizer
    main.WebDatasetSampleWriter = SizeWritingSampleWriter
