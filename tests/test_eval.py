"""Zero-shot and retrieval metrics, class-name files, the paper-style table, and `dalip eval` end to end
against an independent computation with open_clip."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalip.config import load_train_config
from dalip.errors import DalipError
from dalip.evaluate import load_classnames, load_for_eval, markdown_table, recall_at, topk_accuracy
from dalip.templates import IMAGENET_TEMPLATES, PLANT_TEMPLATES, get_templates
from dalip.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_data import CLASSES, shape_image, write_shape_shards  # noqa: E402


# One intra-op thread: on a small shared CPU, more threads make these tiny models much slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_topk_and_recall():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.3, 0.1, 0.2]])
    labels = torch.tensor([0, 1, 2])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}
    # row i's match is column i: ranks 0, 2, 1
    assert recall_at(scores, ks=(1, 2, 3)) == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}


def test_classnames_formats(tmp_path):
    folders = ["a_x", "b_y"]
    f = tmp_path / "names.json"
    f.write_text(json.dumps({"a_x": {"scientific": "Alpha x", "common": "ax plant"}, "b_y": {"scientific": "Beta y"}}))
    assert load_classnames(f, folders) == [["Alpha x", "ax plant"], ["Beta y"]]
    assert load_classnames(f, folders, "common,scientific") == [["ax plant", "Alpha x"], ["Beta y"]]
    f.write_text(json.dumps(["first", "second"]))
    assert load_classnames(f, folders) == [["first"], ["second"]]
    f.write_text(json.dumps({"a_x": "alpha"}))
    with pytest.raises(DalipError, match="no name for class 'b_y'"):
        load_classnames(f, folders)


def test_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES + PLANT_TEMPLATES)
    assert get_templates("plant+simple")[: len(PLANT_TEMPLATES)] == PLANT_TEMPLATES
    with pytest.raises(DalipError, match="unknown template set 'plants'"):
        get_templates("plants")


def test_markdown_table_shape():
    def r(top1):
        return {k: {"top1": top1, "top5": 1.0} for k in ("first", "second", "combined")}

    results = {
        "label": "m",
        "retrieval": {},
        "zero_shot": {"leaves": {"domain": "plant", **r(0.5)}, "cars": {"domain": "general", **r(0.2)},
                      "fungi": {"domain": "plant", **r(0.3)}},
    }  # fmt: skip
    lines = markdown_table([results]).splitlines()
    assert lines[0] == "| Model | cars (general) | leaves (plant) | fungi (plant) | General mean | Plant mean | Mean |"
    assert lines[2] == "| m (first-order) | 20.0 | 50.0 | 30.0 | 20.0 | 40.0 | 33.3 |"
    assert len(lines) == 5
    for d, classes in (("leaves", 4), ("cars", 10), ("fungi", 2)):
        results["zero_shot"][d]["chance"] = 1 / classes
    lines = markdown_table([results]).splitlines()
    assert lines[-1] == "| Chance | 10.0 | 25.0 | 50.0 | 10.0 | 37.5 | 28.3 |"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    shards = write_shape_shards(root / "train", num_shards=2, per_shard=16)
    torch.set_num_threads(1)
    cfg = load_train_config(None, dict(train_data=str(shards), runs_dir=str(root), name="m", batch_size=16, steps=2, workers=0))
    train(cfg)
    return cfg.run_dir


def _imagefolder(root: Path, per_class: int = 3) -> Path:
    rng = random.Random(7)
    names = {}
    for colour, shape in CLASSES[:6]:
        folder = root / f"{colour}_{shape}"
        folder.mkdir(parents=True)
        names[folder.name] = {"scientific": f"{colour} {shape}", "common": f"a {colour} {shape}"}
        for j in range(per_class):
            shape_image(colour, shape, rng).save(folder / f"{j}.png")
    (root / "classnames.json").write_text(json.dumps(names))
    return root


def test_eval_cli_matches_an_independent_computation(trained, tmp_path, monkeypatch, capsys):
    from dalip.cli import main

    folder = _imagefolder(tmp_path / "shapes_eval")
    held_out = write_shape_shards(tmp_path / "held", num_shards=1, per_shard=12, seed=5)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "dalip", "eval", str(trained), "--dataset", f"name=shapes,path={folder},domain=plant,templates=name,name_keys=scientific",
        "--dataset", f"name=shard_shapes,path={held_out},domain=general,class_field=taxon_species",
        "--retrieval", str(held_out), "--out", str(out), "--alpha", "0.3",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert table in capsys.readouterr().out
    assert "| m (combined) |" in table and "I→T R@1" in table

    shapes = results["zero_shot"]["shapes"]
    assert (shapes["num_samples"], shapes["num_classes"], shapes["templates"]) == (18, 6, "name")
    shard_shapes = results["zero_shot"]["shard_shapes"]
    assert shard_shapes["num_samples"] == 12 and shard_shapes["templates"] == "imagenet"
    assert results["means"]["first"]["plant"] == shapes["first"]["top1"]
    assert results["means"]["first"]["general"] == shard_shapes["first"]["top1"]
    ret = results["retrieval"]["held"]
    assert ret["num_pairs"] == 12
    for kind in ("first", "second", "combined"):
        for direction in ("image_to_text", "text_to_image"):
            r = ret[kind][direction]
            assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1

    # Independent: open_clip's own encoders for s1, the DALIP towers for s2, on the same images.
    from torchvision.datasets import ImageFolder

    model, preprocess, tokenizer, _ = load_for_eval(trained)
    ds = ImageFolder(str(folder), transform=preprocess)
    images = torch.stack([x for x, _ in ds])
    labels = torch.tensor([y for _, y in ds])
    names = [f.replace("_", " ") for f in ds.classes]
    with torch.no_grad():
        s1 = F.normalize(model.base.encode_image(images), dim=-1) @ F.normalize(model.base.encode_text(tokenizer(names)), dim=-1).T
        s2 = model.encode_image(images)[1] @ model.encode_text(tokenizer(names))[1].T
    for kind, s in (("first", s1), ("second", s2), ("combined", 0.3 * s1 + 0.7 * s2)):
        expected = (s.argmax(dim=1) == labels).float().mean().item()
        assert shapes[kind]["top1"] == pytest.approx(expected), kind
        assert shapes[kind]["top5"] == pytest.approx((s.topk(5).indices == labels[:, None]).any(1).float().mean().item())


def _clip_benchmark_copy(folder: Path, root: Path) -> Path:
    """The same images in CLIP_benchmark's webdataset layout (test/0.tar, .cls + .webp)."""
    import io

    import webdataset as wds
    from PIL import Image

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    names = json.loads((folder / "classnames.json").read_text())
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(names[c]["scientific"] for c in classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}\n")
    with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
        for i, c in enumerate(classes):
            for j, f in enumerate(sorted((folder / c).iterdir())):
                buf = io.BytesIO()
                Image.open(f).save(buf, format="WEBP", lossless=True)
                sink.write({"__key__": f"{i:03d}{j:03d}", "webp": buf.getvalue(), "cls": str(i).encode()})
    return root


def test_eval_layouts_chance_per_class_and_results_kept_per_step(trained, tmp_path):
    from dalip.evaluate import DatasetSpec, EvalConfig, evaluate, write_results

    folder = _imagefolder(tmp_path / "shapes", per_class=2)
    rows = ["path,label"] + [f"{p.relative_to(folder)},{p.parent.name}" for p in sorted(folder.glob("*/*.png"))]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    bench = _clip_benchmark_copy(folder, tmp_path / "bench")
    few = tmp_path / "few"  # 3 classes: no top-5
    for c in sorted(d for d in folder.iterdir() if d.is_dir())[:3]:
        (few / c.name).mkdir(parents=True)
        for f in c.iterdir():
            (few / c.name / f.name).write_bytes(f.read_bytes())
    specs = [
        DatasetSpec(name="folder", path=str(folder), templates="name", name_keys="scientific"),
        DatasetSpec(name="csv", path=str(folder / "labels.csv"), classnames=str(folder / "classnames.json"), templates="name", name_keys="scientific"),
        DatasetSpec(name="bench", path=str(bench)),
        DatasetSpec(name="few", path=str(few)),
    ]
    results = evaluate(trained, EvalConfig(datasets=specs))
    z = results["zero_shot"]
    assert (z["bench"]["num_samples"], z["bench"]["num_classes"], z["bench"]["templates"]) == (12, 6, "zeroshot_classification_templates.txt")
    for kind in ("first", "second", "combined"):
        assert z["csv"][kind] == z["folder"][kind]  # same images, same names: same scores
    assert z["csv"]["fingerprint"] == z["folder"]["fingerprint"] != z["few"]["fingerprint"]
    assert z["folder"]["chance"] == pytest.approx(1 / 6) and "top5" in z["folder"]["first"]
    assert z["few"]["chance"] == pytest.approx(1 / 3) and "top5" not in z["few"]["first"]
    per_class = z["folder"]["per_class"]["combined"]
    assert len(per_class) == 6 and sum(per_class.values()) / 6 == pytest.approx(z["folder"]["combined"]["top1"])
    matrix = torch.tensor(z["folder"]["confusion"]["matrix"])
    assert matrix.sum() == 12 and matrix.diagonal().sum() / 12 == pytest.approx(z["folder"]["combined"]["top1"])
    assert len(results["model_fingerprint"]) == 64 and results["step"] == 2
    seen = results["train_data"][0]  # from the checkpoint's meta: the mix it trained on
    assert (seen["samples"], seen["shards"], seen["mix_fingerprint"]) == (32, 2, "shapes-0-2x16")

    out = tmp_path / "eval"
    json_path, _ = write_results(results, out)
    assert json_path == out / "step_00000002" / "results.json" and (out / "step_00000002" / "confusion_folder.png").is_file()
    earlier = {**results, "step": 1}
    write_results(earlier, out)
    assert json.loads(json_path.read_text())["step"] == 2  # an earlier step's results did not overwrite it
    assert json.loads((out / "results.json").read_text())["step"] == 1  # the top level is the latest written
    assert "| Chance | " in (out / "results.md").read_text()
