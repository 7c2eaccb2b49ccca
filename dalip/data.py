"""Deterministic, resumable webdataset streams over plantmix shards.

Shard layout (DESIGN §5): `NNNNN.tar` holding `<key>.jpg`, `<key>.txt`, `<key>.json` per sample, plus
`dataset.json` next to the `shards/` directory. Tars are read with webdataset's own tar iterators.

How the training order is fixed
-------------------------------
The global batch of micro-step `t` is the concatenation of `slots` equal slices. The data is cut into
`streams = slots × phases` independent sample streams; stream `k = q·phases + p` fills slice `q` of
every step with `t mod phases == p`. A stream reads its own sequence of shards, identified by an
*ordinal* 0, 1, 2, …:

* epoch mode: the shard list is permuted by `(seed, epoch)`, which lays the epoch's samples out in
  one sequence (each shard in its shuffled order, below). Stream `k` reads a contiguous run of that
  sequence exactly as long as the samples it will serve in the epoch, starting where stream `k − 1`'s
  run ends; so the epoch sees every sample exactly once whatever the shard and stream counts (a
  shard may be split between two streams). Only the tail past the last full batch (fewer samples
  than one global batch) waits for a later epoch, as with `drop_last`. A stream that needs more than
  its run (skipped bad samples, or `--train-num-samples` above the real count) continues cyclically
  into the following samples. This needs the per-shard counts (`dataset.json` or `sizes.json`, else
  a header scan).
* resampled mode: stream `k` draws whole shards with replacement from a RNG seeded by
  `(seed, epoch, k)`, weighted per `::`-separated source.

The stream reads *segments* (a shard, or a part of one), identified by an ordinal 0, 1, 2, …. Each
shard is shuffled in a buffer that does not cross shard boundaries, seeded by `(seed, epoch, shard index)`
in epoch mode (two streams sharing a shard cut the same order) and by `(seed, epoch, k, ordinal)` in
resampled mode; each sample's augmentation is seeded by its position. So a stream's state is four
integers — `(ordinal, offset in the segment, bad samples, bad shards)` — and
`(seed, epoch, step, stream states)` determines every later sample. Resuming skips whole segments
without opening them and replays only the current shard's raw bytes up to the offset (no decoding).

With a `captions` caption field (a list of all valid captions of a duplicate group in the sample's
`.json`), each sample's caption is drawn from that list per epoch, seeded by `(seed, epoch, key)`:
deterministic and stateless, so resuming is exact. Samples without the list use their `.txt`.

Ranks own contiguous slots (`slots` must be a multiple of the world size) and DataLoader workers own
phases (`phases` must be a multiple of the worker count). Who computes a slice never changes what is in
it: a 2-rank run and a 1-rank run with `slots=2` see identical global batches, and a run resumes
exactly on another world size or worker count as long as those divisibilities hold.

Undecodable samples and unreadable (e.g. truncated) shards are skipped and counted per stream; the
counts travel with every batch, so the trainer can report totals over workers and ranks and store them
in checkpoints.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from dalip.errors import DalipError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
JSON_CAPTION_FIELDS = ("caption_scientific", "caption_common", "caption_taxonomic", "caption_combined")
GROUP_CAPTIONS_FIELD = "captions"  # a list in the sample's .json: all valid captions of its duplicate group
STATE_FIELDS = ("ordinal", "offset", "bad_samples", "bad_shards")  # columns of a stream-state row
_LOGGED_BAD_PER_STREAM = 5  # log the first few skipped samples per stream; the rest are only counted


# ---------------------------------------------------------------------------------------------------
# Shard lists


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str) -> list[list[str]]:
    """Expand a shard spec into one list of shard URLs per `::`-separated source.

    Each source is a brace pattern (`shards/{00000..00009}.tar`), a glob, a `.tar` file, a directory of
    `.tar` files, or a plantmix mix directory (its `shards/` subdirectory is used).
    """
    sources: list[list[str]] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            raise DalipError(f"empty source in shard spec {spec!r}")
        urls: list[str] = []
        for item in braceexpand.braceexpand(part):
            if _is_remote(item):
                urls.append(item)
                continue
            path = Path(item).expanduser()
            if path.is_dir():
                tars = sorted(path.glob("*.tar")) or sorted((path / "shards").glob("*.tar"))
                if not tars:
                    raise DalipError(f"{path}: no .tar shards in this directory or in its shards/")
                check_listed_shards(tars[0].parent, {t.name for t in tars})
                urls += [str(t) for t in tars]
            elif any(ch in item for ch in "*?["):
                matches = sorted(glob.glob(str(path)))
                if not matches:
                    raise DalipError(f"shard pattern matches nothing: {item}")
                urls += matches
            elif path.is_file():
                urls.append(str(path))
            else:
                raise DalipError(f"shard not found: {item}")
        sources.append(urls)
    return sources


def _listed_counts(shard_dir: Path) -> dict[str, int]:
    """Per-shard sample counts written by plantmix: `shards/sizes.json` (the webdataset/open_clip
    convention) or `counts.shard` of the mix's `dataset.json`."""
    for candidate, key in ((shard_dir / "sizes.json", None), (shard_dir.parent / "dataset.json", "counts")):
        if not candidate.is_file():
            continue
        try:
            meta = json.loads(candidate.read_text())
        except ValueError as e:
            raise DalipError(f"{candidate}: not valid JSON ({e})") from e
        counts = (meta.get(key) or {}).get("shard") if key else meta
        if isinstance(counts, dict) and all(isinstance(v, int) for v in counts.values()):
            return {Path(name).name: n for name, n in counts.items()}
    return {}


def check_listed_shards(shard_dir: Path, present: set[str]) -> None:
    """Refuse a shard directory whose listing (sizes.json / dataset.json) names shards that are not
    there: training or evaluating on the part that is left would go unnoticed."""
    missing = sorted(set(_listed_counts(shard_dir)) - present)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DalipError(
            f"{shard_dir}: {len(missing)} shard(s) listed in its sizes.json / dataset.json are absent ({shown}); "
            "repair the mix (plantmix verify --repair) or name the shards you want explicitly"
        )


MIX_SUMMARY_KEYS = (
    "name", "mix_fingerprint", "manifest_fingerprint", "recipe_hash", "samples", "num_shards", "plant_share", "seed", "format",
)  # fmt: skip


def describe_sources(sources: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """What a run trains on, per `::` source: its shards' listing fingerprint and, for a plantmix mix,
    the summary of its `dataset.json` (mix fingerprint, recipe hash, counts per domain and source)."""
    out = []
    for urls in sources:
        entry: dict[str, Any] = {"shards": len(urls), "first": urls[0] if urls else None}
        local = [Path(u) for u in urls if not _is_remote(u)]
        listing = sorted(f"{p.name}:{p.stat().st_size}" for p in local if p.is_file())
        entry["listing_fingerprint"] = hashlib.sha256("\n".join(listing).encode()).hexdigest()
        dirs = [local[0].parent.parent, local[0].parent] if local else []  # a mix dir holds shards/ and dataset.json
        card = next((d / "dataset.json" for d in dirs if (d / "dataset.json").is_file()), None)
        if card is not None:
            try:
                meta = json.loads(card.read_text())
            except ValueError:
                meta = {}
            entry["dataset_json"] = str(card)
            entry.update({k: meta[k] for k in MIX_SUMMARY_KEYS if k in meta})
            counts = meta.get("counts") or {}
            entry["counts"] = {k: counts[k] for k in ("domain", "source") if k in counts}
        out.append(entry)
    return out


def count_tar_samples(path: str | Path) -> int:
    """Number of samples (keys with an image member) in a local tar, reading headers only."""
    keys = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for member in tf:
                key, ext = base_plus_ext(member.name)
                if member.isreg() and key is not None and ext.lower() in IMAGE_EXTS:
                    keys.add(key)
    except (tarfile.TarError, OSError) as e:  # truncated or corrupt: count what is readable
        log.warning("%s: counting stopped early: %s", path, e)
    return len(keys)


def shard_sizes(urls: Sequence[str], why: str = "pass --train-num-samples") -> list[int]:
    """Samples per local shard: `dataset.json` / `sizes.json` counts when present, else a header scan."""
    sizes = []
    cache: dict[Path, dict[str, int]] = {}
    for url in urls:
        if _is_remote(url):
            raise DalipError(f"cannot count samples of remote shard {url}; {why}")
        path = Path(url)
        counts = cache.setdefault(path.parent, _listed_counts(path.parent))
        sizes.append(counts[path.name] if path.name in counts else count_tar_samples(path))
    return sizes


def count_samples(urls: Sequence[str]) -> int:
    """Total samples in local shards (see shard_sizes)."""
    return sum(shard_sizes(urls))


def read_shard(url: str, errors: list[Exception]) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `__url__`, and one bytes value per member extension) of one tar.

    Read errors (a truncated or corrupt tar, a missing file) end the shard; they are appended to
    `errors` instead of raised, and the samples read before the error are still yielded.
    """

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return True

    opened = url_opener([{"url": url}], handler=keep_going)
    files = tar_file_expander(opened, handler=keep_going)
    yield from group_by_keys(files, handler=keep_going)


# ---------------------------------------------------------------------------------------------------
# Decoding


def sample_value(sample: dict[str, Any], name: str) -> Any:
    """A field of a raw sample as stored: a member (`txt`, decoded) or a value of its `.json` (any type).

    Keys may be dotted paths (`taxonomy.species`); `taxon_<rank>` also finds plantmix's nested
    `taxonomy.<rank>`.
    """
    if name in sample and not name.startswith("__"):
        value = sample[name]
        return value.decode("utf-8") if isinstance(value, bytes) else value
    else:
        if "__json__" not in sample:
            sample["__json__"] = json.loads(sample["json"]) if "json" in sample else {}
        meta = sample["__json__"]
        value = meta.get(name)
        if value is None and name.startswith("taxon_"):
            value = (meta.get("taxonomy") or {}).get(name[len("taxon_") :])
        if value is None and "." in name:
            value = meta
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
    return value


def sample_field(sample: dict[str, Any], name: str) -> str | None:
    """A text field of a raw sample (see sample_value), stripped; None when absent or empty."""
    value = sample_value(sample, name)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def decode_image(sample: dict[str, Any]) -> Image.Image:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError("no image member")
    with Image.open(io.BytesIO(sample[ext])) as im:
        return im.convert("RGB")  # forces a full decode, so truncated bytes fail here


def decode_caption(sample: dict[str, Any], fields: Sequence[str], draw: tuple | None = None) -> str:
    """The first non-empty field; a list field gives one of its captions: drawn with a RNG seeded by
    `(*draw, sample key)` when `draw` is given (e.g. `(seed, epoch)`), else its first."""
    for name in fields:
        value = sample_value(sample, name)
        if isinstance(value, list):
            options = [str(v).strip() for v in value if isinstance(v, str) and v.strip()]
            if options:
                if draw is None:
                    return options[0]
                return random.Random(stable_seed(*draw, "caption", sample.get("__key__"))).choice(options)
            continue
        value = None if value is None else str(value).strip()
        if value:
            return value
    raise ValueError(f"no caption in field(s) {', '.join(fields)}")


def parse_caption_field(spec: str) -> tuple[str, ...]:
    """`txt`, a `.json` key such as `caption_scientific`, or a comma-separated fallback list.

    The group field `captions` falls back to `txt` (samples outside any duplicate group lack it).
    """
    fields = tuple(f.strip() for f in spec.split(",") if f.strip())
    if not fields:
        raise DalipError("caption field is empty; use txt or a .json key such as caption_scientific")
    if GROUP_CAPTIONS_FIELD in fields and "txt" not in fields:
        fields += ("txt",)
    return fields


# ---------------------------------------------------------------------------------------------------
# Deterministic streams


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and machines (unlike hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the sample order: same spec and position → same samples."""

    shards: tuple[str, ...]
    shard_weights: tuple[float, ...]  # sampling weight per shard (resampled mode)
    seed: int
    resampled: bool
    num_streams: int
    shuffle_buffer: int
    caption_fields: tuple[str, ...]
    shard_sizes: tuple[int, ...] = ()  # samples per shard (epoch mode)
    stream_starts: tuple[int, ...] = ()  # where each stream's run begins in the epoch's sequence


@dataclass(frozen=True)
class Segment:
    """A shard's samples from `start` on, in its shuffled order."""

    url: str
    shuffle_seed: int
    start: int = 0


def _epoch_segments(spec: StreamSpec, epoch: int, stream: int) -> Iterator[Segment]:
    """Stream `stream`'s run of the epoch's sample sequence, then on cyclically (see module doc)."""
    order = list(range(len(spec.shards)))
    random.Random(stable_seed(spec.seed, "order", epoch)).shuffle(order)
    sizes = [spec.shard_sizes[i] for i in order]
    total = sum(sizes)
    if total == 0:
        raise DalipError("the shards hold no samples")
    pos = spec.stream_starts[stream] % total
    first = True
    while True:
        at = 0
        for i, size in zip(order, sizes):
            if size and (not first or pos < at + size):
                start = pos - at if first else 0
                first = False
                seed = stable_seed(spec.seed, "shuffle", epoch, i)  # the shard's index: same order at any path
                yield Segment(spec.shards[i], seed, start)
            at += size


def segments(spec: StreamSpec, epoch: int, stream: int) -> Iterator[Segment]:
    """The infinite segment sequence of one stream in one epoch; item i is the segment of ordinal i.

    In epoch mode a segment runs to the end of its shard even where the next stream's run starts
    inside it: the reading stream stops at its own run's end unless it must make up skipped samples.
    """
    if not spec.resampled:
        yield from _epoch_segments(spec, epoch, stream)
        return
    rng = random.Random(stable_seed(spec.seed, "resample", epoch, stream))
    for ordinal in itertools.count():
        url = rng.choices(spec.shards, weights=spec.shard_weights)[0]
        yield Segment(url, stable_seed(spec.seed, "shuffle", epoch, stream, ordinal))


@dataclass
class StreamState:
    ordinal: int = 0  # shard ordinal being read
    offset: int = 0  # samples of that (shuffled) shard already emitted
    bad_samples: int = 0
    bad_shards: int = 0

    def as_list(self) -> list[int]:
        return [self.ordinal, self.offset, self.bad_samples, self.bad_shards]


class SampleStream:
    """One stream of transformed (image, caption) pairs, resumable from a StreamState."""

    def __init__(self, spec: StreamSpec, epoch: int, stream: int, state: StreamState, transform: Callable):
        self.spec, self.epoch, self.stream, self.state = spec, epoch, stream, state
        self.transform = transform
        self._raw = self._raw_samples()
        self._good_in_shard = False
        self._dry_shards = 0  # consecutive shards that gave no usable sample
        self._last_error: str = ""

    def _raw_samples(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        start_ordinal, skip = self.state.ordinal, self.state.offset
        for ordinal, segment in enumerate(segments(self.spec, self.epoch, self.stream)):
            if ordinal < start_ordinal:
                continue  # consumed before the checkpoint: not even opened
            url = segment.url
            errors: list[Exception] = []
            samples: Iterator[dict[str, Any]] = read_shard(url, errors)
            if self.spec.shuffle_buffer > 1:
                rng = random.Random(segment.shuffle_seed)
                bufsize = self.spec.shuffle_buffer
                samples = _shuffle(samples, bufsize=bufsize, initial=bufsize, rng=rng)
            self._good_in_shard = False
            first = segment.start + (skip if ordinal == start_ordinal else 0)
            for i, sample in enumerate(itertools.islice(samples, first, None), start=first - segment.start):
                # samples before `first` are replayed raw bytes, never decoded
                self.state.offset = i + 1
                yield ordinal, i, sample
            if errors:
                self.state.bad_shards += 1
                self._last_error = f"{url}: {errors[0]}"
                log.warning("skipping the rest of unreadable shard %s: %s", url, errors[0])
            self._dry_shards = 0 if self._good_in_shard else self._dry_shards + 1
            if self._dry_shards > len(self.spec.shards) + 1:  # a whole cycle gave nothing
                raise DalipError(
                    f"no usable sample in {self._dry_shards} shards in a row (stream {self.stream}); "
                    f"check the caption field {','.join(self.spec.caption_fields)!r} and the shards; "
                    f"last problem: {self._last_error}"
                )
            self.state.ordinal, self.state.offset = ordinal + 1, 0

    def take(self, n: int) -> tuple[list[torch.Tensor], list[str]]:
        """The next n usable samples; undecodable ones are skipped and counted."""
        images: list[torch.Tensor] = []
        captions: list[str] = []
        while len(images) < n:
            ordinal, index, sample = next(self._raw)
            try:
                caption = decode_caption(sample, self.spec.caption_fields, draw=(self.spec.seed, self.epoch))
                image = decode_image(sample)
                # Augmentation depends on the sample's position only, not on what ran before. Only the
                # CPU generator (the one fork_rng saves and the transforms draw from) is seeded:
                # torch.manual_seed would also queue a seed for every lazy accelerator backend, with a
                # stack trace each (about 2 ms a sample, more than decoding it).
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(stable_seed(self.spec.seed, "augment", self.epoch, self.stream, ordinal, index))
                    tensor = self.transform(image)
            except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
                self.state.bad_samples += 1
                self._last_error = f"{sample.get('__url__')}:{sample.get('__key__')}: {e}"
                if self.state.bad_samples <= _LOGGED_BAD_PER_STREAM:
                    log.warning("skipping sample %s", self._last_error)
                continue
            self._good_in_shard = True
            images.append(tensor)
            captions.append(caption)
        return images, captions


class TrainStream(IterableDataset):
    """The local part of every global micro-batch of one epoch, from `step` on (see module doc)."""

    def __init__(
        self,
        spec: StreamSpec,
        *,
        transform: Callable,
        tokenizer: Callable,
        global_batch: int,
        steps_per_epoch: int,
        slots: int,
        phases: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if slots % world_size:
            raise DalipError(f"data slots ({slots}) must be a multiple of the world size ({world_size})")
        if global_batch % slots:
            raise DalipError(f"micro-batch size {global_batch} must be a multiple of the data slots ({slots})")
        self.spec, self.transform, self.tokenizer = spec, transform, tokenizer
        self.slot_batch = global_batch // slots
        self.steps_per_epoch = steps_per_epoch
        self.slots, self.phases = slots, phases
        self.my_slots = range(rank * slots // world_size, (rank + 1) * slots // world_size)
        self.epoch, self.start_step = 0, 0
        self.start_states = torch.zeros(slots * phases, len(STATE_FIELDS), dtype=torch.long)

    def owned_streams(self) -> torch.Tensor:
        """Boolean mask over streams: those this rank reads."""
        mask = torch.zeros(self.slots * self.phases, dtype=torch.bool)
        for q in self.my_slots:
            mask[q * self.phases : (q + 1) * self.phases] = True
        return mask

    def set_position(self, epoch: int, step: int, states: torch.Tensor) -> None:
        self.epoch, self.start_step, self.start_states = epoch, step, states.clone()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.phases % num_workers:
            raise DalipError(f"data phases ({self.phases}) must be a multiple of the workers ({num_workers})")
        streams: dict[int, SampleStream] = {}
        # DataLoader hands out batches round-robin over workers, starting at worker 0.
        for step in range(self.start_step + worker, self.steps_per_epoch, num_workers):
            phase = step % self.phases
            images: list[torch.Tensor] = []
            captions: list[str] = []
            rows = []
            for slot in self.my_slots:
                k = slot * self.phases + phase
                if k not in streams:
                    state = StreamState(*self.start_states[k].tolist())
                    streams[k] = SampleStream(self.spec, self.epoch, k, state, self.transform)
                slot_images, slot_captions = streams[k].take(self.slot_batch)
                images += slot_images
                captions += slot_captions
                rows.append([k, *streams[k].state.as_list()])
            yield {
                "step": step,
                "images": torch.stack(images),
                "texts": self.tokenizer(captions),
                "streams": torch.tensor(rows, dtype=torch.long),
            }


# ---------------------------------------------------------------------------------------------------
# The trainer's view


@dataclass
class DataPosition:
    """Where training stands in the data; saved in checkpoints (plain ints and one long tensor).

    `streams` holds one STATE_FIELDS row per stream, for the current epoch; `bad_*_before` are totals of
    finished epochs over all ranks.
    """

    epoch: int
    step: int
    streams: torch.Tensor
    bad_samples_before: int = 0
    bad_shards_before: int = 0

    @classmethod
    def start(cls, num_streams: int) -> "DataPosition":
        return cls(0, 0, torch.zeros(num_streams, len(STATE_FIELDS), dtype=torch.long))

    def update(self, batch: dict[str, Any]) -> None:
        rows = batch["streams"]
        self.streams[rows[:, 0]] = rows[:, 1:]
        self.step = int(batch["step"]) + 1

    def synced(self, owned: torch.Tensor) -> torch.Tensor:
        """Stream states of all ranks (each rank knows only its own rows between syncs)."""
        rows = self.streams * owned[:, None]
        if dist.is_available() and dist.is_initialized():
            on_gpu = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
            rows = rows.cuda() if on_gpu else rows
            dist.all_reduce(rows)
            rows = rows.cpu()
        return rows

    def bad_totals(self, owned: torch.Tensor) -> tuple[int, int]:
        """(bad samples, bad shards) skipped so far over all ranks. Collective under DDP."""
        rows = self.synced(owned)
        return (self.bad_samples_before + int(rows[:, 2].sum()), self.bad_shards_before + int(rows[:, 3].sum()))

    def next_epoch(self, owned: torch.Tensor) -> None:
        self.bad_samples_before, self.bad_shards_before = self.bad_totals(owned)
        self.epoch, self.step = self.epoch + 1, 0
        self.streams.zero_()

    def state_dict(self, owned: torch.Tensor) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "streams": self.synced(owned),
            "bad_samples_before": self.bad_samples_before,
            "bad_shards_before": self.bad_shards_before,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "DataPosition":
        return cls(
            int(state["epoch"]),
            int(state["step"]),
            state["streams"].clone().long(),
            int(state["bad_samples_before"]),
            int(state["bad_shards_before"]),
        )


@dataclass
class TrainData:
    """The training stream plus its DataLoader settings; `loader()` starts it at a position."""

    dataset: TrainStream
    num_samples: int
    steps_per_epoch: int  # micro-steps
    num_workers: int
    pin_memory: bool = False
    sources: list[list[str]] = field(default_factory=list)

    @property
    def num_streams(self) -> int:
        return self.dataset.slots * self.dataset.phases

    def loader(self, position: DataPosition) -> DataLoader:
        self.dataset.set_position(position.epoch, position.step, position.streams)
        return DataLoader(
            self.dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # A private generator: creating a loader must not advance the global RNG (exact resume).
            generator=torch.Generator().manual_seed(0),
            prefetch_factor=2 if self.num_workers else None,
        )


def stream_starts(steps: int, slots: int, phases: int, slot_batch: int) -> tuple[int, ...]:
    """Where each stream's run begins in an epoch's sample sequence: stream k = q·phases + p serves
    slice q of the steps t ≡ p (mod phases), so the runs are laid end to end in stream order."""
    starts, at = [], 0
    for k in range(slots * phases):
        starts.append(at)
        at += len(range(k % phases, steps, phases)) * slot_batch
    return tuple(starts)


def build_train_data(
    spec: str,
    *,
    transform: Callable,
    tokenizer: Callable,
    micro_batch: int,
    seed: int,
    resampled: bool = False,
    source_weights: Sequence[float] | None = None,
    caption_field: str = "txt",
    num_samples: int | None = None,
    shuffle_buffer: int = 1000,
    slots: int | None = None,
    phases: int | None = None,
    num_workers: int = 0,
    step_multiple: int = 1,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> TrainData:
    """Resolve shards and build the training stream for a global micro-batch of `micro_batch` samples.

    Defaults: `slots` = world size, `phases` = number of workers (at least 1). The epoch has
    `num_samples // micro_batch` micro-steps, rounded down to a multiple of `step_multiple`.
    """
    sources = expand_shards(spec)
    if source_weights is not None:
        if not resampled:
            raise DalipError("source weights need resampled mode (--resampled)")
        if len(source_weights) != len(sources):
            raise DalipError(f"{len(source_weights)} source weights for {len(sources)} '::'-separated sources")
        if any(w < 0 for w in source_weights) or sum(source_weights) <= 0:
            raise DalipError(f"source weights must be non-negative with a positive sum: {list(source_weights)}")
    shards, weights = [], []
    for i, urls in enumerate(sources):
        w = 1.0 if source_weights is None else source_weights[i] * sum(map(len, sources)) / len(urls)
        shards += urls
        weights += [w] * len(urls)
    slots = slots or world_size
    phases = phases or max(1, num_workers)
    num_streams = slots * phases
    sizes: list[int] = []
    if not resampled:  # each stream's run of the epoch is cut by sample counts
        sizes = shard_sizes(shards, "epoch mode needs per-shard sample counts: use --resampled")
    if num_samples is None:
        num_samples = sum(sizes) if sizes else count_samples(shards)
    steps = num_samples // micro_batch // step_multiple * step_multiple
    if steps == 0:
        raise DalipError(f"{num_samples} training samples do not fill one batch of {micro_batch * step_multiple}")
    stream_spec = StreamSpec(
        shards=tuple(shards),
        shard_weights=tuple(weights),
        seed=seed,
        resampled=resampled,
        num_streams=num_streams,
        shuffle_buffer=shuffle_buffer,
        caption_fields=parse_caption_field(caption_field),
        shard_sizes=tuple(sizes),
        stream_starts=stream_starts(steps, slots, phases, micro_batch // slots),
    )
    dataset = TrainStream(
        stream_spec,
        transform=transform,
        tokenizer=tokenizer,
        global_batch=micro_batch,
        steps_per_epoch=steps,
        slots=slots,
        phases=phases,
        rank=rank,
        world_size=world_size,
    )
    return TrainData(dataset, num_samples, steps, num_workers, pin_memory, sources)


# ---------------------------------------------------------------------------------------------------
# Evaluation data


class EvalShards(IterableDataset):
    """Every usable sample of some shards once, as (image tensor, text field value, sha256 of the image
    bytes); order irrelevant.

    Shards are split over DataLoader workers. Samples lacking the image or the field are skipped and
    logged.
    """

    def __init__(self, urls: Sequence[str], transform: Callable, text_fields: Sequence[str]):
        self.urls, self.transform, self.text_fields = list(urls), transform, tuple(text_fields)

    def worker_urls(self) -> list[str]:
        """This DataLoader worker's share of the shards (all of them outside a worker)."""
        info = get_worker_info()
        return self.urls[info.id :: info.num_workers] if info else self.urls

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, str]]:
        for url in self.worker_urls():
            errors: list[Exception] = []
            for sample in read_shard(url, errors):
                try:
                    text = decode_caption(sample, self.text_fields)
                    image = self.transform(decode_image(sample))
                except Exception as e:  # noqa: BLE001 - skipped and logged, never fatal
                    log.warning("skipping eval sample %s:%s: %s", url, sample.get("__key__"), e)
                    continue
                ext = next(e for e in IMAGE_EXTS if e in sample)
                yield image, text, hashlib.sha256(sample[ext]).hexdigest()
            if errors:
                log.warning("skipping the rest of unreadable shard %s: %s", url, errors[0])
