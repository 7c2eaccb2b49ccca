"""Overlap loading with writing: the next items load on threads while the caller works on this one."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T, R = TypeVar("T"), TypeVar("R")


def ahead(load: Callable[[T], R], items: Iterable[T], depth: int = 1) -> Iterator[tuple[T, R]]:
    """(item, load(item)) in order, the next `depth` items loading on threads while the caller works on
    this one: Arrow reads, takes and writes release the GIL, so loading overlaps writing (and, with
    depth 2, a second load uses the core a single-threaded step leaves idle)."""
    items = list(items)
    with ThreadPoolExecutor(max(1, depth)) as pool:
        pending = deque(pool.submit(load, item) for item in items[:depth])
        for i, item in enumerate(items):
            result = pending.popleft().result()
            if i + depth < len(items):
                pending.append(pool.submit(load, items[i + depth]))
            yield item, result
