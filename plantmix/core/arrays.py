"""Zero-copy numpy views of Arrow arrays, for the vectorised stages."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, uint8 data) of a string array, without copying the data."""
    if strings.type != pa.large_string():
        strings = strings.cast(pa.large_string())
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets, data
