"""Image folders that the model-based checks read (evaluation sets, support images): listing and encoding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from plantmix.core.errors import PlantmixError
from plantmix.core.members import IMAGE_EXTS

ENCODE_BATCH = 256  # images decoded and encoded at once: bounds the decoded pixels held in memory


def image_files(folder: Path, what: str) -> list[Path]:
    """Every image file below `folder` (class subfolders allowed), sorted; one error line if it has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PlantmixError(f"{what}: {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not files:
        raise PlantmixError(f"{what}: {folder} holds no images ({', '.join(IMAGE_EXTS)})")
    return files


def encode_files(scorer, files: list[Path], progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised float32 embeddings of the decodable files, bool mask of the files that decoded)."""
    out, ok = [], np.zeros(len(files), bool)
    for s in range(0, len(files), ENCODE_BATCH):
        images = []
        for i, path in enumerate(files[s : s + ENCODE_BATCH], start=s):
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
                ok[i] = True
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue  # counted by the caller through the mask
        if images:
            out.append(scorer.encode_images(images))
        if progress:
            progress(min(s + ENCODE_BATCH, len(files)), len(files))
    return (np.concatenate(out) if out else np.zeros((0, 0), np.float32)), ok
