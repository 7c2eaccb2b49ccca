"""The training stream: shard specs, determinism, resume positions, DDP slices, bad data.

`write_shape_shards` (also used by the other dalip tests) writes plantmix-layout shards of generated
images: a few classes of coloured shapes, captioned with their names.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from dalip.data import (
    DataPosition,
    build_train_data,
    count_samples,
    count_tar_samples,
    expand_shards,
    read_shard,
    sample_field,
)
from dalip.errors import DalipError

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 40), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
CLASSES = [(c, s) for c in COLOURS for s in SHAPES]


# One intra-op thread: on a small shared CPU, more threads make these tiny models much slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shape_image(colour: str, shape: str, rng: random.Random, size: int = 40) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 4, size // 2 - 2)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shape_shards(
    out: Path, num_shards: int = 4, per_shard: int = 16, seed: int = 0, classes=CLASSES, prefix: str = "",
    group_captions: int = 0,
) -> Path:
    """`out/shards/NNNNN.tar` + `out/dataset.json` in the plantmix layout; returns the shards dir.

    `group_captions` > 0: every even sample's json carries a `captions` list of that many captions."""
    rng = random.Random(seed)
    shard_dir = Path(out) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for s in range(num_shards):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(shard_dir / name)) as sink:
            for i in range(per_shard):
                colour, shape = classes[rng.randrange(len(classes))]
                key = f"{prefix}{s:03d}{i:04d}"
                caption = f"a photo of a {colour} {shape}"
                meta = {
                    "uid": key, "key": key, "source": "shapes", "domain": "plant", "license": "CC0", "caption": caption,
                    "caption_scientific": f"{colour} {shape}", "caption_common": f"a {colour} {shape}",
                    "caption_taxonomic": f"{shape} of genus {colour}", "caption_combined": f"a {colour} {shape}, a shape",
                    "taxonomy": {"genus": colour, "species": f"{colour} {shape}"},
                }  # fmt: skip
                if group_captions and i % 2 == 0:
                    meta["captions"] = [f"{key} caption {j}" for j in range(group_captions)]
                sink.write({"__key__": key, "jpg": jpeg(shape_image(colour, shape, rng)), "txt": caption.encode(), "json": json.dumps(meta).encode()})
        counts[name] = per_shard
    card = {"name": Path(out).name, "samples": sum(counts.values()), "counts": {"shard": counts}, "mix_fingerprint": f"shapes-{seed}-{num_shards}x{per_shard}"}
    (Path(out) / "dataset.json").write_text(json.dumps(card))
    return shard_dir


def identity(image):
    import torchvision.transforms.functional as TF

    return TF.to_tensor(image.resize((8, 8)))


def captions_tokenizer(captions):
    """Encodes each caption as a tensor of its bytes, so tests can read batches back."""
    out = torch.zeros(len(captions), 64, dtype=torch.long)
    for i, c in enumerate(captions):
        b = c.encode()[:64]
        out[i, : len(b)] = torch.tensor(list(b))
    return out


def decode_captions(texts: torch.Tensor) -> list[str]:
    return [bytes(t[t > 0].tolist()).decode() for t in texts]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shape_shards(tmp_path_factory.mktemp("shapes"), num_shards=4, per_shard=16)


def _data(spec, **kw):
    args = dict(transform=identity, tokenizer=captions_tokenizer, micro_batch=8, seed=0, shuffle_buffer=8)
    args.update(kw)
    return build_train_data(str(spec), **args)


def _keys(data, position=None, limit=None):
    position = position or DataPosition.start(data.num_streams)
    out = []
    for batch in data.loader(position):
        position.update(batch)
        out.append(decode_captions(batch["texts"]))
        if limit and len(out) == limit:
            break
    return out, position


def test_expand_shards_patterns_dirs_and_sources(shards):
    mix = shards.parent
    assert expand_shards(str(mix)) == expand_shards(str(shards)) == [[str(p) for p in sorted(shards.glob("*.tar"))]]
    braced = expand_shards(f"{shards}/{{00000..00001}}.tar::{shards}/00003.tar")
    assert [len(s) for s in braced] == [2, 1]
    assert count_samples(expand_shards(str(shards))[0]) == 64  # from dataset.json
    assert count_tar_samples(shards / "00001.tar") == 16  # header scan, used without dataset.json
    with pytest.raises(DalipError, match="shard not found"):
        expand_shards(f"{shards}/99999.tar")


def test_stream_is_deterministic_and_covers_the_epoch(shards):
    data = _data(shards)
    assert data.steps_per_epoch == 8
    first, _ = _keys(data)
    again, _ = _keys(_data(shards))
    assert first == again
    samples = [c for batch in first for c in batch]
    assert len(samples) == 64  # 1 stream over all shards: each sample once per epoch
    other_seed, _ = _keys(_data(shards, seed=1))
    assert other_seed != first


def test_resume_from_position_continues_the_stream(shards):
    for kw in ({}, {"num_workers": 2}, {"resampled": True}):
        data = _data(shards, **kw)
        full, _ = _keys(data)
        head, position = _keys(data, limit=3)
        state = position.state_dict(data.dataset.owned_streams())
        tail, _ = _keys(_data(shards, **kw), DataPosition.from_state_dict(state))
        assert head + tail == full, kw


def test_two_slots_split_each_global_batch_like_two_ranks(shards):
    """slots=2 on one process == two ranks with one slot each, concatenated in rank order."""
    single, _ = _keys(_data(shards, slots=2))
    ranks = [_keys(_data(shards, rank=r, world_size=2))[0] for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    assert set(map(tuple, ranks[0])).isdisjoint(map(tuple, ranks[1]))


def test_workers_do_not_change_the_order(shards):
    # phases fix the order; workers only decide who computes which step
    two_phases, _ = _keys(_data(shards, phases=2))
    with_workers, _ = _keys(_data(shards, phases=2, num_workers=2))
    assert with_workers == two_phases


def test_caption_field_selection(shards):
    batches, _ = _keys(_data(shards, caption_field="caption_common"), limit=1)
    assert all(c.startswith("a ") and "photo" not in c for c in batches[0])
    batches, _ = _keys(_data(shards, caption_field="caption_missing,caption_scientific"), limit=1)
    assert all(len(c.split()) == 2 for c in batches[0])


def test_sample_fields_reach_into_the_json(shards):
    sample = next(read_shard(str(shards / "00000.tar"), []))
    colour, shape = sample_field(sample, "caption_scientific").split()
    assert sample_field(sample, "txt") == f"a photo of a {colour} {shape}"
    assert sample_field(sample, "taxon_species") == sample_field(sample, "taxonomy.species") == f"{colour} {shape}"
    assert sample_field(sample, "taxon_family") is None


def _corrupt_copy(src: Path, dst: Path) -> Path:
    """Copy of the shards where one sample's JPEG is garbage and the last shard is truncated."""
    dst.mkdir(parents=True)
    tars = sorted(src.glob("*.tar"))
    for i, tar in enumerate(tars):
        samples = list(read_shard(str(tar), []))
        with wds.TarWriter(str(dst / tar.name)) as sink:
            for j, s in enumerate(samples):
                s = {k: v for k, v in s.items() if k != "__url__"}
                if i == 0 and j == 2:
                    s["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
                sink.write(s)
    last = dst / tars[-1].name
    with tarfile.open(last) as tf:
        cut = [m for m in tf.getmembers() if m.name.endswith(".txt")][len(samples) // 2].offset_data + 3
    last.write_bytes(last.read_bytes()[:cut])  # ends inside a caption: that sample has an image only
    return dst


def test_bad_samples_and_truncated_shards_are_skipped_and_counted(shards, tmp_path):
    bad = _corrupt_copy(shards, tmp_path / "bad")
    data = _data(bad, num_samples=48)
    batches, position = _keys(data)
    assert len(batches) == 6 and all(len(b) == 8 for b in batches)
    samples, broken = position.bad_totals(data.dataset.owned_streams())
    assert (samples, broken) == (2, 1)  # the garbage JPEG, the half-written sample; one truncated shard


def test_stream_with_no_usable_sample_fails_clearly(shards):
    data = _data(shards, caption_field="caption_missing")
    with pytest.raises(DalipError, match="no usable sample.*caption_missing"):
        _keys(data, limit=1)


def test_layout_errors(shards):
    with pytest.raises(DalipError, match="epoch mode needs per-shard sample counts"):
        _data(f"{shards}/00000.tar::http://example.invalid/00001.tar", num_samples=32)
    with pytest.raises(DalipError, match="multiple of the world size"):
        _data(shards, slots=3, world_size=2)
    with pytest.raises(DalipError, match="source weights need resampled"):
        _data(shards, source_weights=[1.0])


@pytest.mark.parametrize(
    "num_shards,per_shard,kw",
    [
        (5, 16, {"phases": 2}),  # the layout that used to skip 8 samples and repeat 8
        (7, 8, {"phases": 2, "num_workers": 2}),  # unequal steps per stream
        (3, 16, {"slots": 2, "phases": 2, "num_workers": 2}),
        (2, 16, {"phases": 4, "num_workers": 2}),  # fewer shards than streams
        (5, 16, {"slots": 3, "micro_batch": 9}),
    ],
)
def test_an_epoch_sees_every_sample_exactly_once(tmp_path, num_shards, per_shard, kw):
    shards = write_shape_shards(tmp_path, num_shards=num_shards, per_shard=per_shard, seed=3)
    data = _data(shards, caption_field="uid", **kw)
    batches, _ = _keys(data)
    seen = [k for b in batches for k in b]
    total = num_shards * per_shard
    micro = kw.get("micro_batch", 8)
    assert len(seen) == total // micro * micro
    assert len(set(seen)) == len(seen), "a sample was repeated within the epoch"
    if total % micro == 0:
        assert len(seen) == total


def test_resume_mid_epoch_on_split_shards(tmp_path):
    shards = write_shape_shards(tmp_path, num_shards=5, per_shard=16)
    kw = {"phases": 2, "num_workers": 2, "caption_field": "uid"}
    data = _data(shards, **kw)
    full, _ = _keys(data)
    head, position = _keys(data, limit=5)  # stream 1's run starts inside the third shard
    tail, _ = _keys(_data(shards, **kw), DataPosition.from_state_dict(position.state_dict(data.dataset.owned_streams())))
    assert head + tail == full


def test_group_captions_are_drawn_per_sample_and_epoch(tmp_path):
    shards = write_shape_shards(tmp_path, num_shards=2, per_shard=16, group_captions=4)
    lists = {}
    for tar in sorted(shards.glob("*.tar")):
        for sample in read_shard(str(tar), []):
            meta = json.loads(sample["json"])
            lists[meta["key"]] = (meta.get("captions"), sample["txt"].decode())

    def epoch(n, **kw):
        data = _data(shards, caption_field="captions", **kw)
        position = DataPosition(n, 0, torch.zeros(data.num_streams, 4, dtype=torch.long))
        return [c for b in _keys(data, position)[0] for c in b]

    first = epoch(0)
    assert len(first) == 32
    by_key = {}
    for caption in first:
        key = caption.split()[0] if " caption " in caption else None
        by_key[key] = by_key.get(key, 0) + 1
    with_list = [k for k, (group, _) in lists.items() if group]
    without = [txt for group, txt in lists.values() if not group]
    assert sorted(k for k in by_key if k) == sorted(with_list)  # one caption of each group, once
    assert sorted(c for c in first if " caption " not in c) == sorted(without)  # no list: the .txt
    assert all(c in lists[c.split()[0]][0] for c in first if " caption " in c)
    assert epoch(0) == first  # deterministic
    assert sorted(epoch(0, phases=2, num_workers=2)) == sorted(first)  # the draw ignores the data layout
    assert epoch(1) != first  # a new draw next epoch
    data = _data(shards, caption_field="captions", phases=2, num_workers=2)
    full, _ = _keys(data)
    head, position = _keys(data, limit=1)
    tail, _ = _keys(_data(shards, caption_field="captions", phases=2, num_workers=2), DataPosition.from_state_dict(position.state_dict(data.dataset.owned_streams())))
    assert head + tail == full  # exact under resume
    assert len({c for c in first if " caption " in c} ^ {c for c in epoch(1) if " caption " in c}) > 0


def test_order_does_not_depend_on_where_the_shards_are(shards, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere" / "mix"
    shutil.copytree(shards.parent, moved)
    for kw in ({"phases": 2}, {"resampled": True, "num_samples": 32}):
        here, _ = _keys(_data(shards, caption_field="uid", **kw))
        there, _ = _keys(_data(moved / "shards", caption_field="uid", **kw))
        assert here == there, kw
