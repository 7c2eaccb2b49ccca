"""Text helpers for the vectorised stages: Python's whitespace set, zero-copy views of string arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# The characters Python's str.isspace() accepts (what str.strip() and str.split() use); the SQL and
# RE2 expressions that replace per-row Python use this set so they decide exactly as Python did.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
WHITESPACE_RE2 = "".join(rf"\x{{{ord(c):x}}}" for c in WHITESPACE)  # body of an RE2 character class


def string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, uint8 data) of a string array, without copying the data."""
    if strings.type != pa.large_string():
        strings = strings.cast(pa.large_string())
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets, data
