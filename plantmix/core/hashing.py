"""Perceptual hashes of images as uint64, and vectorised Hamming distances between them.

`phash64` is imagehash's 64-bit DCT pHash with the 8×8 bit matrix packed row-major, first bit in the
most significant position (the same order as `str(imagehash.phash(img))` read as hex).
"""

from __future__ import annotations

import io

import imagehash
import numpy as np
from PIL import Image, ImageOps

from plantmix.core.errors import PlantmixError

# popcount of every 16-bit value: four table lookups per uint64 beat bit-twiddling in numpy 1.26,
# which has no bitwise_count.
_POPCOUNT16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)


def phash64(image: Image.Image) -> int:
    """64-bit DCT pHash of a PIL image as an unsigned int (< 2**64), bits packed MSB-first."""
    bits = imagehash.phash(image, hash_size=8).hash  # (8, 8) bool
    return int.from_bytes(np.packbits(bits.reshape(-1)).tobytes(), "big")


def phash_bytes(data: bytes) -> int:
    """Decode encoded image bytes (jpg/png/webp/...) and return their `phash64`."""
    return phash_pair_bytes(data)[0]


def phash_pair_bytes(data: bytes) -> tuple[int, int]:
    """(`phash64` of the image, `phash64` of its mirror image) from one decode.

    pHash starts by shrinking to 32×32 grey; PIL's resize to the size an image already has is a copy,
    so hashing that thumbnail gives exactly `phash64(image)`, and its mirror costs one more small DCT.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            small = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL signals unreadable or truncated data with OSError (UnidentifiedImageError is one) or ValueError.
        raise PlantmixError(f"cannot decode image bytes ({len(data)} bytes): {e}") from None
    return phash64(small), phash64(ImageOps.mirror(small))


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each element of a uint64 array (uint8 result, same shape)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    q = x.view(np.uint16).reshape(*x.shape, 4)
    t = _POPCOUNT16
    return t[q[..., 0]] + t[q[..., 1]] + t[q[..., 2]] + t[q[..., 3]]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise Hamming distance between uint64 hash arrays (broadcasting like `a ^ b`)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    return popcount64(np.bitwise_xor(a, b))
