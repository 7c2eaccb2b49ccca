"""Tar member names, split the way webdataset groups them: one rule for the whole project."""

from __future__ import annotations

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members of download and mix shards


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the key is the path up to the first dot of its basename.

    `a/b.c/x.seg.png` → (`a/b.c/x`, `seg.png`): dots in directory names belong to the key, and a
    multi-part extension stays whole, as in webdataset.
    """
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext
