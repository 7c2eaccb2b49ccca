"""Idempotent, atomic stages (DESIGN §3).

A stage's output is valid only if its marker file `<output>.done.json` holds the fingerprint of the
stage's inputs and parameters. Outputs are written under a temporary name and renamed into place, so a
killed stage leaves either nothing or a complete previous output, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError


def listing(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of a file, or of every file below a directory, sorted.

    What make and rsync trust: an edit changes size or mtime, and listing 100k files costs a
    fraction of a second where hashing their bytes costs minutes.
    """
    path = Path(path)
    if not path.is_dir():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    stack = [str(path)]
    prefix = len(os.path.join(str(path), ""))  # entry paths extend the root's: slicing is relpath, 10x cheaper
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    out.append((e.path[prefix:], st.st_size, st.st_mtime_ns))
    return sorted(out)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(params: Any, inputs: list[Path] | tuple[Path, ...] = ()) -> str:
    """A stable hash of JSON-able parameters and the state of input files or directories.

    An input with a `.done.json` marker (a stage output) is represented by the marker, which holds
    its own fingerprint; a directory by its listing (path, size, mtime: an image folder of a million
    files is listed in seconds, never read); any other file by the sha256 of its bytes, so a copied
    build or URL list keeps its fingerprint. Large data files that are not stage outputs (download
    tars) are fingerprinted by their `listing` in the parameters instead.
    """
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    for p in inputs:
        p = Path(p)
        marker = done_marker(p)
        if marker.exists():
            h.update(marker.read_bytes())
        elif p.is_dir():
            h.update(json.dumps(listing(p)).encode())
        else:
            h.update(file_digest(p).encode())
    return h.hexdigest()


def done_marker(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".done.json")


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path` (a marker, a record), or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_done(output: Path, key: str) -> bool:
    """True when `output` exists and was completed with fingerprint `key`."""
    return Path(output).exists() and (read_json_object(done_marker(output)) or {}).get("key") == key


def mark_done(output: Path, key: str, **info: Any) -> None:
    atomic_write_text(done_marker(output), json.dumps({"key": key, **info}, sort_keys=True, indent=1))


def clear_done(output: Path) -> None:
    done_marker(output).unlink(missing_ok=True)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds.

    Works for files and directories. On failure the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    _remove(tmp)
    try:
        yield tmp
        _failpoint(path)
        if tmp.is_dir() and path.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def remove_stale_temporaries(root: Path) -> int:
    """Delete the temporaries (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`) that killed processes left
    under `root`; those of live processes stay. Returns how many were removed."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            m = _TEMP_NAME.match(name)
            if m and not _alive(int(m.group(1))):
                _remove(Path(dirpath) / name)
                removed += 1
    return removed


_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _failpoint(path: Path) -> None:
    """Crash-test hook: `PLANTMIX_KILL_AT=<file name>` SIGKILLs the process just before that output's
    rename, i.e. with its temporary fully written — the worst moment for a kill. Tests use it to check
    that a build killed mid-stage resumes to the same result."""
    if os.environ.get("PLANTMIX_KILL_AT") == path.name:
        os.kill(os.getpid(), signal.SIGKILL)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write a parquet file atomically (zstd, deterministic layout)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=256_000)


def require_columns(path: Path, required: list[str] | tuple[str, ...], what: str = "manifest") -> list[str]:
    """The column names of a parquet file, checked to be readable and to include `required`."""
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowInvalid) as e:
        raise PlantmixError(f"{path}: cannot read {what}: {str(e).splitlines()[0]}") from None
    missing = [c for c in required if c not in names]
    if missing:
        raise PlantmixError(f"{path}: missing column(s) {missing}")
    return names


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a build's parquet file; a missing or unreadable one (truncated, not parquet) is one error line."""
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as e:
        raise PlantmixError(f"{path}: cannot read: {str(e).splitlines()[0]}; rerun `plantmix build` to redo it") from None


# ---- stages and their runner ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One step of a build (DESIGN §3), declared once; the build is a list of them.

    A *table* stage returns its output table from `run` (or None after streaming it to `output`
    atomically itself); the runner fingerprints its inputs and parameters, skips the stage when
    `output` already carries that fingerprint, else writes the table atomically and marks it. A *managed* stage (download, hashes, mixes) keeps its own per-part
    markers and skips finished parts itself: its `run` returns whether it did any work.
    """

    name: str
    describe: str  # one line, for the console and the dry-run plan
    output: Path
    run: Callable[[], pa.Table | bool | None]
    managed: bool = False
    inputs: Callable[[], list[Path]] = lambda: []
    params: dict = field(default_factory=dict)
    version: int = 1
    count: Callable[[], str] | None = None  # a short summary of the output ("664 rows"), after the run


@dataclass
class StageResult:
    name: str
    ran: bool
    seconds: float
    summary: str


def stage_key(stage: Stage) -> str:
    return fingerprint({"stage": stage.name, "v": stage.version, **stage.params}, stage.inputs())


def run_stage(stage: Stage) -> StageResult:
    """Run one stage unless its output is current; see `Stage`."""
    start = time.perf_counter()
    if stage.managed:
        ran = bool(stage.run())
    else:
        key = stage_key(stage)
        ran = not (is_done(stage.output, key) and _intact(stage.output))
        if ran:
            table = stage.run()
            if table is not None:
                write_parquet(table, stage.output)
            # None: the stage streamed its output to `output` itself (atomically)
            mark_done(stage.output, key, rows=pq.read_metadata(stage.output).num_rows)
    summary = stage.count() if stage.count else _rows_summary(stage.output)
    return StageResult(stage.name, ran, time.perf_counter() - start, summary)


def _intact(output: Path) -> bool:
    """Whether a finished table stage's parquet output still reads as the rows its marker recorded
    (a truncated or replaced file makes the stage run again instead of failing the next one)."""
    if output.suffix != ".parquet":
        return True
    try:
        return pq.read_metadata(output).num_rows == json.loads(done_marker(output).read_text()).get("rows")
    except (OSError, ValueError, pa.ArrowInvalid):
        return False


def _rows_summary(output: Path) -> str:
    if output.suffix == ".parquet" and output.is_file():
        return f"{pq.read_metadata(output).num_rows:,} rows"
    return ""
