"""The embeddings layout (DESIGN §3): clip-retrieval's, one file triple per download tar.

    BUILD/embeddings/<source>/
      img_emb/img_emb_<shard>.npy          float16, (n, d), L2-normalised image embeddings
      text_emb/text_emb_<shard>.npy        float16, (n, d), L2-normalised caption embeddings
      metadata/metadata_<shard>.parquet    one row per embedding, same order: uid, image_path (the
                                           tar member key), caption, and the download json's fields
      <shard>.done.json                    written last: the tar's fingerprint and the scorer's

`clip-retrieval index BUILD/embeddings/<source>` reads a source folder as it is: files sort by shard,
so embeddings and metadata line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError

EMBEDDINGS_DIR = "embeddings"


@dataclass(frozen=True)
class ShardFiles:
    image: Path
    text: Path
    metadata: Path
    marker: Path

    def all(self) -> tuple[Path, Path, Path, Path]:
        return self.image, self.text, self.metadata, self.marker


def source_dir(build_dir: Path, source: str) -> Path:
    return Path(build_dir) / EMBEDDINGS_DIR / source


def shard_files(folder: Path, shard: str) -> ShardFiles:
    """The files of one download tar's embeddings under a source folder (`shard` e.g. "00003")."""
    folder = Path(folder)
    return ShardFiles(
        folder / "img_emb" / f"img_emb_{shard}.npy", folder / "text_emb" / f"text_emb_{shard}.npy",
        folder / "metadata" / f"metadata_{shard}.parquet", folder / f"{shard}.done.json",
    )  # fmt: skip


def finished_shards(folder: Path) -> list[str]:
    """Shards whose marker exists, sorted (the marker is written after the three data files)."""
    return sorted(p.name.removesuffix(".done.json") for p in Path(folder).glob("*.done.json"))


@dataclass
class Embeddings:
    """Embeddings of many rows, aligned: row i of `image` and `text` belongs to `uid[i]`."""

    uid: pa.Array  # string
    source: pa.Array  # string
    image: np.ndarray  # float16 (n, d)
    text: np.ndarray  # float16 (n, d)

    def __len__(self) -> int:
        return len(self.uid)

    def table(self) -> pa.Table:
        return pa.table({"uid": self.uid, "source": self.source})


def read_embeddings(build_dir: Path, sources: list[str] | None = None, text: bool = True) -> Embeddings:
    """Every finished shard's embeddings of `sources` (all sources when None), in source and shard order."""
    root = Path(build_dir) / EMBEDDINGS_DIR
    names = sources if sources is not None else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    uids, srcs, images, texts = [], [], [], []
    for name in names:
        folder = root / name
        for shard in finished_shards(folder):
            files = shard_files(folder, shard)
            uid = pq.read_table(files.metadata, columns=["uid"])["uid"].combine_chunks().cast(pa.string())
            image = np.load(files.image)
            caption = np.load(files.text) if text else np.zeros((len(image), 0), np.float16)
            if not (len(uid) == len(image) == len(caption) or (not text and len(uid) == len(image))):
                raise PlantmixError(f"{folder}: shard {shard} has {len(uid)} metadata rows but {len(image)} image / {len(caption)} text embeddings; delete {files.marker.name} and rerun the embed stage")
            uids.append(uid)
            srcs.append(pa.array([name] * len(uid), pa.string()))
            images.append(image.astype(np.float16, copy=False))
            texts.append(caption.astype(np.float16, copy=False))
    if not uids:
        return Embeddings(pa.array([], pa.string()), pa.array([], pa.string()), np.zeros((0, 0), np.float16), np.zeros((0, 0), np.float16))
    return Embeddings(pa.concat_arrays(uids), pa.concat_arrays(srcs), np.concatenate(images), np.concatenate(texts))


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)
