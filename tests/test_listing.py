"""Directory fingerprints: `listing` gives every file's path relative to the root, as os.path.relpath does."""

from __future__ import annotations

import os

import pytest

from plantmix.core.stage import listing


@pytest.mark.parametrize("relative", [False, True])
def test_listing_paths_are_relative_to_the_root(tmp_path, monkeypatch, relative):
    root = tmp_path / "images"
    for rel in ("a/1.jpg", "a/b/2.jpg", "c/3.png", "4.jpg", "d/e/f/5.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "empty").mkdir()
    os.symlink(root / "a", root / "link")  # a symlinked folder is not followed
    want = sorted((os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, files in os.walk(root) for f in files)
    if relative:
        monkeypatch.chdir(tmp_path)
        root = type(root)("images")
    assert listing(root) == want
    assert [p for p, _, _ in listing(root)] == ["4.jpg", "a/1.jpg", "a/b/2.jpg", "c/3.png", "d/e/f/5.jpg"]
