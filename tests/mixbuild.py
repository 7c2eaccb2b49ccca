"""A small synthetic build directory for mix and shard tests: manifest.parquet with the schema's
columns, and download tars in img2dataset's layout (webdataset TarWriter, real JPEG bytes)."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from plantmix.core.schema import CANDIDATE_FIELDS, MANIFEST_EXTRA_FIELDS, TAXON_RANKS

SCHEMA = pa.schema(
    [f for f in CANDIDATE_FIELDS if f.name != "drop_reason"] + MANIFEST_EXTRA_FIELDS + [pa.field("drop_reason", pa.string())]
)
SOURCES = {"plant_a": "plant", "plant_b": "plant", "web": "general"}


def jpeg(rng: random.Random, size: int = 16) -> bytes:
    arr = np.array([[[rng.randrange(256) for _ in range(3)]] * size] * size, dtype=np.uint8)
    arr = (arr + np.arange(size, dtype=np.uint8)[:, None, None] * 7).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_build(
    root: Path, rows: dict[str, int] | None = None, species: int = 12, per_tar: int = 40, seed: int = 0
) -> Path:
    """rows: candidate rows per source. About 1 in 8 rows is dropped (keep = false), some before download."""
    rows = rows or {"plant_a": 160, "plant_b": 80, "web": 90}
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for source, n in rows.items():
        domain = SOURCES[source]
        out = root / "download" / source
        out.mkdir(parents=True, exist_ok=True)
        writer, shard_id, in_shard = None, -1, per_tar
        for i in range(n):
            uid = hashlib.sha256(f"{source}\x00{i}".encode()).hexdigest()[:32]
            r = {f.name: None for f in SCHEMA}
            r.update(uid=uid, source=source, domain=domain, url=f"http://example.org/{source}/{i}.jpg",
                     license=rng.choice(["CC-BY-4.0", "CC0-1.0", "CC-BY-NC-4.0"]),
                     attribution=f"photographer {i % 7}", input_rows=1, source_key=str(i), keep=True)  # fmt: skip
            if domain == "plant":
                s = min(int(rng.paretovariate(1.2)) - 1, species - 1)  # long tail over species
                genus = f"Genus{s % 4}"
                tax = dict(kingdom="Plantae", phylum="Tracheophyta", class_="Magnoliopsida", order=f"Order{s % 2}",
                           family=f"Family{s % 2}", genus=genus, species=f"{genus} species{s}")  # fmt: skip
                for rank in TAXON_RANKS:
                    r[f"taxon_{rank}"] = tax["class_" if rank == "class" else rank]
                r["common_name"] = f"common plant {s}"
                r["caption_scientific"] = f"a photo of {tax['species']}"
                r["caption_common"] = f"a photo of a {r['common_name']}"
                r["caption"] = r["caption_scientific"]
            else:
                r["caption"] = f"a general scene number {i}"
            fate = rng.random()
            if fate < 0.04:
                r.update(keep=False, status="not_attempted", drop_reason="unsupported_url_scheme")
            elif fate < 0.08:
                r.update(keep=False, status="failed_to_download", error_message="404", drop_reason="download_failed")
            else:
                if in_shard == per_tar:
                    if writer:
                        writer.close()
                    shard_id, in_shard = shard_id + 1, 0
                    writer = wds.TarWriter(str(out / f"{shard_id:05d}.tar"))
                key = f"{shard_id:05d}{in_shard:04d}"
                in_shard += 1
                img = jpeg(rng)
                writer.write({"__key__": key, "jpg": img, "txt": r["caption"], "json": json.dumps({"key": key}).encode()})
                r.update(status="success", sha256=hashlib.sha256(img).hexdigest(), phash=rng.getrandbits(64),
                         width=16, height=16, shard=f"download/{source}/{shard_id:05d}.tar", key=key)  # fmt: skip
                if fate < 0.14:
                    r.update(keep=False, drop_reason="caption_too_short")
            records.append(r)
        if writer:
            writer.close()
    pq.write_table(pa.Table.from_pylist(records, schema=SCHEMA), root / "manifest.parquet", row_group_size=100)
    return root


def kept(build: Path) -> dict[str, int]:
    t = pq.read_table(build / "manifest.parquet", columns=["domain", "keep"]).to_pylist()
    return {d: sum(1 for r in t if r["keep"] and r["domain"] == d) for d in ("plant", "general")}
