"""`plantmix verify`: re-read every shard of a mix and check it against what the writer recorded;
and the cheap check a rerun makes before it skips a finished output (`output_intact`).

Checks per shard: the tar reads to the end; the sample count matches dataset.json and the shard's
parquet; each sample has an image, a caption and a JSON; every image decodes; the sha256 of each
image matches the shard parquet (the bytes as written, which may differ from the manifest's sha256 of
the originally downloaded bytes when img2dataset resized or re-encoded them); the JSON's uid and key
and the caption match the parquet row. Extra or missing shards are reported too.

Before a rerun skips an output it checks the output against its marker: each marker records the
size and sha256 of the file(s) it vouches for. The size is always compared; the bytes are hashed
when the file is small or was modified after its marker was written (an edit in place, a copy), so a
finished 13M-sample mix is checked in a listing's time and a truncated, deleted or rewritten file is
redone, not trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from plantmix.core.pools import worker_pool
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image
from rich.console import Console
from rich.table import Table

from plantmix.core.errors import PlantmixError
from plantmix.core.members import IMAGE_EXTS, split_member
from plantmix.core.stage import done_marker, file_digest, read_json_object

MAX_PROBLEMS_PER_SHARD = 20
ALWAYS_HASHED_BYTES = 1 << 20  # files up to this size are hashed on every check: it costs nothing


def file_record(path: Path) -> dict[str, int | str]:
    """What a marker records about one output file: its size and the sha256 of its bytes."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_digest(path)}


def record_matches(path: Path, record: dict | None, marker: Path) -> bool:
    """Whether `path` still holds what `record` (from `marker`) says: same size, and same sha256 when
    the file is small or newer than the marker. A verified file newer than its marker (a copy) gets
    the marker's mtime refreshed, so the next check is quick again."""
    path = Path(path)
    if not isinstance(record, dict) or not path.is_file():
        return False
    st = path.stat()
    if st.st_size != record.get("bytes"):
        return False
    newer = st.st_mtime_ns > marker.stat().st_mtime_ns
    if st.st_size > ALWAYS_HASHED_BYTES and not newer:
        return True
    if file_digest(path) != record.get("sha256"):
        return False
    if newer:
        os.utime(marker)
    return True


def read_marker(output: Path) -> dict | None:
    """The JSON of an output's `.done.json` marker, or None when it is missing or unreadable."""
    return read_json_object(done_marker(output))


def output_intact(output: Path, key: str, *records: str) -> bool:
    """True when `output` was completed with fingerprint `key` and every file its marker records
    still matches: `file` is the output itself; other record names are siblings (`parquet` of a
    shard tar is the tar's .parquet)."""
    output = Path(output)
    marker = read_marker(output)
    if marker is None or marker.get("key") != key:
        return False
    paths = {"file": output, "parquet": output.with_suffix(".parquet")}
    return all(record_matches(paths[name], marker.get(name), done_marker(output)) for name in ("file", *records))


@dataclass
class ShardCheck:
    shard: str
    expected: int | None
    found: int = 0
    bad_images: int = 0
    bad_hashes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_SHARD:
            self.problems.append(f"{self.shard}: {text}")
        elif len(self.problems) == MAX_PROBLEMS_PER_SHARD:
            self.problems.append(f"{self.shard}: (further problems not listed)")


@dataclass
class VerifyReport:
    shards_dir: Path
    dataset: dict
    shards: list[ShardCheck]
    problems: list[str]  # problems not tied to one shard

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.shards)

    @property
    def samples(self) -> int:
        return sum(s.found for s in self.shards)


def _iter_samples(path: Path):
    """(key, {ext: bytes}) per sample, streaming; consecutive members with one key form a sample."""
    key, sample = None, {}
    with tarfile.open(path, "r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, ext = split_member(m.name)
            data = tf.extractfile(m).read()
            if k != key and key is not None:
                yield key, sample
                sample = {}
            key = k
            sample[ext.lower()] = data
    if key is not None:
        yield key, sample


def verify_shard(tar: Path, expected: int | None) -> ShardCheck:
    check = ShardCheck(tar.name, expected)
    parquet = tar.with_suffix(".parquet")
    rows = pq.read_table(parquet).to_pylist() if parquet.exists() else None
    if rows is None:
        check.problem("per-shard parquet missing; hashes cannot be checked")
    try:
        for i, (key, sample) in enumerate(_iter_samples(tar)):
            check.found += 1
            row = rows[i] if rows is not None and i < len(rows) else None
            _check_sample(check, key, sample, row)
    except (tarfile.TarError, OSError, EOFError) as e:
        check.problem(f"unreadable after {check.found} samples (truncated or corrupt tar): {e}")
    if expected is not None and check.found != expected:
        check.problem(f"{check.found} samples, dataset.json says {expected}")
    if rows is not None and len(rows) != check.found:
        check.problem(f"{check.found} samples, its parquet lists {len(rows)}")
    return check


def _check_sample(check: ShardCheck, key: str, sample: dict, row: dict | None) -> None:
    where = f"sample '{key}'"
    images = [e for e in sample if e in IMAGE_EXTS]
    missing = [e for e, present in (("image", images), ("txt", "txt" in sample), ("json", "json" in sample)) if not present]
    if missing:
        check.problem(f"{where}: missing {', '.join(missing)}")
    if row is not None and row["key"] != key:
        check.problem(f"{where}: parquet lists '{row['key']}' at this position")
        row = None
    if images:
        data = sample[images[0]]
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as e:  # PIL raises many types for bad data; any of them means "does not decode"
            check.bad_images += 1
            check.problem(f"{where}: image does not decode: {e}")
        if row is not None and hashlib.sha256(data).hexdigest() != row["sha256"]:
            check.bad_hashes += 1
            check.problem(f"{where}: image sha256 differs from the shard parquet")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            check.problem(f"{where}: invalid JSON: {e}")
            meta = None
        if meta is not None and row is not None and (meta.get("uid"), meta.get("key")) != (row["uid"], key):
            check.problem(f"{where}: JSON uid/key differ from the shard parquet")
    if "txt" in sample and row is not None and sample["txt"].decode("utf-8", "replace") != row["caption"]:
        check.problem(f"{where}: caption differs from the shard parquet")


def _find_dataset_json(shards_dir: Path) -> Path:
    for p in (shards_dir / "dataset.json", shards_dir.parent / "dataset.json"):
        if p.is_file():
            return p
    raise PlantmixError(f"{shards_dir}: no dataset.json here or in the parent directory")


def _verify_job(args: tuple[Path, int | None]) -> ShardCheck:
    return verify_shard(*args)


def verify_shards(shards_dir: Path, workers: int = 1) -> VerifyReport:
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise PlantmixError(f"{shards_dir}: not a directory")
    ds_path = _find_dataset_json(shards_dir)
    try:
        dataset = json.loads(ds_path.read_text())
        expected: dict[str, int] = dataset["counts"]["shard"]
    except (ValueError, KeyError, TypeError) as e:
        raise PlantmixError(f"{ds_path}: not a plantmix dataset.json ({e})") from None
    present = {p.name for p in shards_dir.glob("*.tar")}
    problems = [f"{name}: listed in dataset.json but missing" for name in sorted(set(expected) - present)]
    problems += [f"{name}: not listed in dataset.json" for name in sorted(present - set(expected))]
    if sum(expected.values()) != dataset.get("samples"):
        problems.append(f"dataset.json: shard counts sum to {sum(expected.values())}, samples = {dataset.get('samples')}")
    jobs = [(shards_dir / name, expected.get(name)) for name in sorted(present)]
    if workers > 1:
        with worker_pool(workers) as pool:
            checks = list(pool.map(_verify_job, jobs))
    else:
        checks = [_verify_job(j) for j in jobs]
    return VerifyReport(shards_dir, dataset, checks, problems)


def print_report(report: VerifyReport, console: Console) -> None:
    table = Table(title=f"verify {report.shards_dir}")
    for col, justify in (("shard", "left"), ("expected", "right"), ("found", "right"),
                         ("undecodable", "right"), ("hash mismatch", "right"), ("status", "left")):  # fmt: skip
        table.add_column(col, justify=justify)
    for s in report.shards:
        status = "[green]ok[/]" if s.ok else f"[red]{len(s.problems)} problem(s)[/]"
        exp = "—" if s.expected is None else f"{s.expected:,}"
        table.add_row(s.shard, exp, f"{s.found:,}", str(s.bad_images), str(s.bad_hashes), status)
    console.print(table)
    for line in report.problems + [p for s in report.shards for p in s.problems]:
        console.print(f"[red]✗[/] {line}", highlight=False)
    verdict = "[bold green]OK[/]" if report.ok else "[bold red]FAILED[/]"
    console.print(f"{verdict}: {report.samples:,} samples in {len(report.shards)} shards checked", highlight=False)
