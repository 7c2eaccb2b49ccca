"""The demo world's per-domain validation data (DESIGN §5, §7).

`write_validation(root, ...)` adds to a generated world:

    validation/plant/00000.tar      held-out plant image–caption pairs (species of the world)
    validation/general/00000.tar    held-out general scenes with their captions
    classify/<scene>/NNNN.png, classify/classnames.json   a general-domain classification set

and `write_pretrain(root, ...)`:

    pretrain/00000.tar              plant and general image-caption pairs, shuffled: the demo's stand-in
                                    for the web-scale data a pretrained CLIP has seen, on which the
                                    demo's scorer model is bootstrapped (configs/dalip-scorer.yaml). A
                                    scorer trained on the rows it then scores learns their mismatched
                                    captions by heart; one trained on other pairs of the same world does not.

Domain-pure and drawn from their own seed streams through the world's diversity guard, so they are
new images, far in pHash from every training and evaluation image; the mixing-law targets are the
validation loss on the shards, the general zero-shot column of the results table the scene set.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds

from plantmix.demo.draw import SCENE_KINDS, draw_plant, draw_scene
from plantmix.mix.shards import TAR_MTIME
from plantmix.stages.captions import caption_variants_of

# Stream ids of the world's seeded generators (training, lists and eval use 1 to 4, model-curation cases 8 to 11).
_PLANT_VALIDATION_STREAM, _GENERAL_VALIDATION_STREAM, _CLASSIFY_STREAM = 5, 6, 7
_PLANT_PRETRAIN_STREAM, _GENERAL_PRETRAIN_STREAM, _PRETRAIN_ORDER_STREAM = 12, 13, 14
SCENE_CLASSNAMES = {
    "street": ["a street with houses and cars", "a street"],
    "sea": ["sailboats on the sea", "the sea"],
    "sky": ["balloons in the sky", "the sky"],
    "shapes": ["geometric shapes on a plain background", "shapes"],
    "night": ["a street at night", "a night scene"],
}


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_pairs(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, wds.TarWriter(f, user="", group="", mode=0o644, mtime=TAR_MTIME, encoder=False) as w:
        for s in samples:
            meta = json.dumps(s["meta"], sort_keys=True, ensure_ascii=False)
            w.write({"__key__": s["key"], "jpg": s["jpg"], "txt": s["meta"]["caption"].encode(), "json": meta.encode()})



def read_pairs(path: Path) -> Iterator[tuple[str, dict, bytes]]:
    """(key, json metadata, jpg bytes) of every sample of a json + jpg shard (the world's pair shards,
    img2dataset's download tars), in key order."""
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            yield key, json.loads(tar.extractfile(members[name]).read()), tar.extractfile(members[key + ".jpg"]).read()


def _plant_pairs(selected, config, guard, per_species: int, stream: int = _PLANT_VALIDATION_STREAM,
                 prefix: str = "val") -> list[dict]:
    from plantmix.demo.world import _seeded, _with_rng, plant_caption

    samples = []
    for sp in selected:
        taxa = {f"taxon_{r}": v for r, v in sp.taxonomy.items()} | {"common_name": sp.common_name}
        variants = {f"caption_{t}": v for t, v in caption_variants_of(taxa).items() if v}
        for j in range(per_species):
            rng_of = _seeded(config.seed, stream, sp.index, j)
            image, (view, rng) = guard.draw(lambda a: _with_rng(draw_plant(sp.traits, r := rng_of(a), config.image_size), r))
            meta = {"caption": plant_caption(sp, view, rng), "domain": "plant", **variants,
                    "taxonomy": dict(sp.taxonomy), "common_name": sp.common_name}  # fmt: skip
            samples.append({"key": f"{prefix}-plant-{sp.index:03d}-{j:03d}", "jpg": _jpeg(image), "meta": meta})
    return samples


def _general_pairs(config, guard, count: int, stream: int = _GENERAL_VALIDATION_STREAM, prefix: str = "val") -> list[dict]:
    from plantmix.demo.world import _seeded

    samples = []
    for g in range(count):
        rng_of = _seeded(config.seed, stream, g)
        image, caption = guard.draw(lambda a: draw_scene(rng_of(a), config.image_size))
        samples.append({"key": f"{prefix}-general-{g:04d}", "jpg": _jpeg(image), "meta": {"caption": caption, "domain": "general"}})
    return samples


def _write_classify(root: Path, config, guard) -> int:
    from plantmix.demo.world import _seeded

    for c, kind in enumerate(SCENE_KINDS):
        folder = root / "classify" / kind
        folder.mkdir(parents=True)
        for j in range(config.classify_per_class):
            rng_of = _seeded(config.seed, _CLASSIFY_STREAM, c, j)
            image, _ = guard.draw(lambda a: draw_scene(rng_of(a), config.image_size, kind=kind))
            image.save(folder / f"{j:04d}.png", "PNG", compress_level=1)
    text = json.dumps(SCENE_CLASSNAMES, indent=1, sort_keys=True)
    (root / "classify" / "classnames.json").write_text(text + "\n", encoding="utf-8")
    return len(SCENE_KINDS) * config.classify_per_class


def write_validation(root: Path, selected: list, config, guard) -> dict[str, int]:
    """Write the validation shards and the classification set under `root` (each only when its
    count is positive); return their sizes."""
    root = Path(root)
    plant = _plant_pairs(selected, config, guard, config.validation_per_species)
    general = _general_pairs(config, guard, config.general_validation)
    for name, samples in (("plant", plant), ("general", general)):
        if samples:
            _write_pairs(root / "validation" / name / "00000.tar", samples)
    classify = _write_classify(root, config, guard) if config.classify_per_class else 0
    return {"validation_plant": len(plant), "validation_general": len(general), "classify_general": classify}


def write_pretrain(root: Path, selected: list, config, guard) -> int:
    """Write pretrain/00000.tar (config.pretrain_factor times the lists' drawings per domain, in a seeded
    random order so every batch mixes both domains) and its images as support/{plant,general}/KEY.jpg;
    return its size. A larger factor only adds drawings:
    sample j of a species or scene is the same whatever the factor."""
    import numpy as np

    plant = _plant_pairs(selected, config, guard, config.pretrain_factor * config.images_per_species,
                         _PLANT_PRETRAIN_STREAM, "pretrain")
    general = _general_pairs(config, guard, config.pretrain_factor * config.general_images, _GENERAL_PRETRAIN_STREAM,
                             "pretrain")
    samples = plant + general
    order = np.random.default_rng([config.seed, _PRETRAIN_ORDER_STREAM]).permutation(len(samples))
    _write_pairs(Path(root) / "pretrain" / "00000.tar", [samples[i] for i in order])
    # the same images as folders per domain: support images for relevance's nearest-neighbour score
    for domain, pairs in (("plant", plant), ("general", general)):
        folder = Path(root) / "support" / domain
        folder.mkdir(parents=True)
        for s in pairs:
            (folder / f"{s['key']}.jpg").write_bytes(s["jpg"])
    return len(samples)
