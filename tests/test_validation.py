"""Per-domain validation: the demo world's validation pairs and scene classes, and `dalip eval`'s
fixed-batch validation loss (bit-identical across evaluations and data-loader batch sizes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import imagehash
import pytest
import torch
from PIL import Image

from dalip.errors import DalipError
from dalip.validation import ValidationSpec, load_pairs, validation_loss

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_shape_shards  # noqa: E402
from test_eval import trained as checkpoint  # noqa: E402,F401  (a 2-step tiny DALIP run)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    from plantmix.core.recipe import DemoWorldConfig
    from plantmix.demo.world import generate_world

    cfg = DemoWorldConfig(species=3, images_per_species=3, heldout_per_species=1, general_images=6, image_size=64,
                          validation_per_species=2, general_validation=5, classify_per_class=2)  # fmt: skip
    return generate_world(tmp_path_factory.mktemp("world") / "w", cfg)


def _tar_members(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tf:
        return tf.getnames()


def test_demo_world_writes_domain_pure_validation_and_scene_classes(small_world):
    info = json.loads((small_world / "world.json").read_text())
    assert (info["validation_plant"], info["validation_general"], info["classify_general"]) == (6, 5, 10)
    plant = _tar_members(small_world / "validation" / "plant" / "00000.tar")
    general = _tar_members(small_world / "validation" / "general" / "00000.tar")
    assert len(plant) == 6 * 3 and len(general) == 5 * 3  # jpg, txt, json per sample
    assert all(m.startswith("val-plant-") for m in plant) and all(m.startswith("val-general-") for m in general)
    names = json.loads((small_world / "classify" / "classnames.json").read_text())
    folders = sorted(p.name for p in (small_world / "classify").iterdir() if p.is_dir())
    assert folders == sorted(names) and len(folders) == 5
    assert all(len(list((small_world / "classify" / f).glob("*.png"))) == 2 for f in folders)


def _phash_or_none(path: Path):
    try:  # the served files include planted corrupt and truncated payloads
        with Image.open(path) as im:
            return imagehash.phash(im.convert("RGB"))
    except OSError:
        return None


def test_validation_images_are_new_images(small_world):
    """Far in pHash from every served training file (the world's diversity guard drew them)."""
    import webdataset as wds

    served = [h for p in (small_world / "files").rglob("*") if (h := _phash_or_none(p)) is not None]
    assert len(served) > 10
    for sample in wds.WebDataset(str(small_world / "validation" / "plant" / "00000.tar"), shardshuffle=False).decode("pil"):
        h = imagehash.phash(sample["jpg"])
        assert min(h - s for s in served) > 8


def _eval(checkpoint: Path, val_dir: Path, out: Path, monkeypatch, *extra: str) -> dict:
    from dalip.cli import main

    monkeypatch.setattr(sys, "argv", ["dalip", "eval", str(checkpoint), "--validation", f"name=val,shards={val_dir},domain=plant",
                                      "--loss-batch-size", "8", "--out", str(out), *extra])  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    return json.loads((out / "results.json").read_text())["validation"]["val"]


def test_eval_validation_loss_is_bit_identical(checkpoint, tmp_path, monkeypatch, capsys):
    val = write_shape_shards(tmp_path / "val", num_shards=2, per_shard=10, seed=3)
    first = _eval(checkpoint, val, tmp_path / "a", monkeypatch)
    again = _eval(checkpoint, val, tmp_path / "b", monkeypatch)
    other_loader = _eval(checkpoint, val, tmp_path / "c", monkeypatch, "--batch-size", "3", "--workers", "2")
    assert first == again == other_loader  # floats compared exactly
    assert (first["num_pairs"], first["num_batches"], first["unused_pairs"]) == (20, 2, 4)
    assert first["combined"] == pytest.approx(0.5 * first["first"] + 0.5 * first["second"])
    assert "| val | plant | 20 | 8 |" in (tmp_path / "a" / "results.md").read_text()
    # a different loss batch size is a different (documented) target
    assert _eval(checkpoint, val, tmp_path / "d", monkeypatch, "--loss-batch-size", "4")["first"] != first["first"]


def test_validation_loss_matches_the_training_loss_on_one_batch(checkpoint, tmp_path):
    """Independent: DALIPLoss of one forward pass over the key-sorted pairs."""
    from dalip.evaluate import load_for_eval
    from dalip.loss import DALIPLoss

    val = write_shape_shards(tmp_path / "val", num_shards=1, per_shard=6, seed=4)
    model, preprocess, tokenizer, _ = load_for_eval(checkpoint)
    spec = ValidationSpec(name="v", shards=str(val), domain="general")
    got = validation_loss(model, preprocess, tokenizer, spec, alpha=0.3, loss_batch_size=6)
    pairs = load_pairs(spec, preprocess, batch_size=2, workers=0)
    assert [k for k, _, _ in pairs] == sorted(k for k, _, _ in pairs)
    with torch.no_grad():
        _, parts = DALIPLoss(alpha=0.3)(model(torch.stack([p[1] for p in pairs]), tokenizer([p[2] for p in pairs])))
    assert got["first"] == pytest.approx(float(parts["loss_first"])) and got["combined"] == pytest.approx(float(parts["total"]))


def test_too_few_pairs_is_a_clear_error(checkpoint, tmp_path):
    from dalip.evaluate import load_for_eval

    val = write_shape_shards(tmp_path / "val", num_shards=1, per_shard=3)
    model, preprocess, tokenizer, _ = load_for_eval(checkpoint)
    with pytest.raises(DalipError, match="3 pairs, fewer than one loss batch of 32"):
        validation_loss(model, preprocess, tokenizer, ValidationSpec(name="v", shards=str(val), domain="plant"), alpha=0.5)


def test_pretrain_factor_sizes_the_pretraining_pool_and_only_adds_drawings(small_world, tmp_path):
    from plantmix.core.recipe import DemoWorldConfig
    from plantmix.demo.validation import read_pairs
    from plantmix.demo.world import generate_world

    info = json.loads((small_world / "world.json").read_text())
    assert info["pretrain_pairs"] == 2 * (3 * 3 + 6)  # the default factor 2: twice the lists' drawings
    cfg = DemoWorldConfig(species=3, images_per_species=3, heldout_per_species=1, general_images=6, image_size=64,
                          validation_per_species=2, general_validation=5, classify_per_class=2, pretrain_factor=3)  # fmt: skip
    larger = generate_world(tmp_path / "w3", cfg)
    assert json.loads((larger / "world.json").read_text())["pretrain_pairs"] == 3 * (3 * 3 + 6)
    small = {key: jpg for key, _, jpg in read_pairs(small_world / "pretrain" / "00000.tar")}
    big = {key: jpg for key, _, jpg in read_pairs(larger / "pretrain" / "00000.tar")}
    assert len(big) == 45 and all(big.get(key) == jpg for key, jpg in small.items())
    # the rest of the world does not depend on the pool
    for name in ("plant_urls.parquet", "general_urls.parquet", "ground_truth.parquet"):
        assert (larger / name).read_bytes() == (small_world / name).read_bytes()
    with pytest.raises(ValueError):
        DemoWorldConfig(pretrain_factor=0)
