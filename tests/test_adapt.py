"""Few-shot adaptation: Tip-Adapter against independent computations, the split protocol (by sha256,
reproducible by seed), `dalip adapt` on a plain open_clip export and its one-line errors."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalip.fewshot import METHODS, Task, supervised_contrastive, tip_logits, zero_shot

sys.path.insert(0, str(Path(__file__).parent))
from test_data import CLASSES, shape_image  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clustered_task(seed=0, classes=4, shots=3, test=20, dim=16, noise=0.6, text_noise=0.8) -> tuple[Task, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g, dtype=torch.float64), dim=-1)

    def draw(n):
        labels = torch.arange(classes).repeat_interleave(n)
        return F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g, dtype=torch.float64), dim=-1), labels

    support, support_labels = draw(shots)
    queries, query_labels = draw(test // classes)
    text = F.normalize(centres + text_noise * torch.randn(classes, dim, generator=g, dtype=torch.float64), dim=-1)
    return Task(support, support_labels, queries, text), query_labels


def test_tip_adapter_with_alpha_zero_is_zero_shot_exactly():
    task, _ = _clustered_task()
    values = F.one_hot(task.support_labels, task.num_classes).double()
    for beta in (0.5, 5.5, 50.0):
        tip = tip_logits(task.test, task.support, values, task.text, alpha=0.0, beta=beta)
        assert torch.equal(tip, zero_shot(task)[0])
    # independent: 100 · cosine to each class text, by explicit loops
    expected = np.array([[100 * float(np.dot(q, t)) for t in task.text.numpy()] for q in task.test.numpy()])
    np.testing.assert_allclose(zero_shot(task)[0].numpy(), expected, rtol=1e-12)


def test_tip_adapter_cache_alone_with_large_beta_is_one_nearest_neighbour():
    for seed in range(5):
        task, _ = _clustered_task(seed=seed)
        values = F.one_hot(task.support_labels, task.num_classes).double()
        cache = tip_logits(task.test, task.support, values, None, alpha=1.0, beta=200.0)
        assert (cache.max(dim=1).values > 0).all()  # no underflow to an all-zero row
        support, labels = task.support.numpy(), task.support_labels.numpy()
        nearest = [labels[int(np.argmax([np.dot(q, s) for s in support]))] for q in task.test.numpy()]
        assert cache.argmax(dim=1).tolist() == nearest


def test_every_method_beats_chance_on_separable_features_and_is_deterministic():
    task, labels = _clustered_task(seed=3, shots=4, test=40, noise=0.3, text_noise=0.2)
    for name, method in METHODS.items():
        logits, chosen = method(task)
        again, _ = method(task)
        assert logits.shape == (40, 4) and torch.equal(logits, again), name
        assert (logits.argmax(1) == labels).float().mean() > 0.5, name
        assert "test" not in json.dumps(chosen)  # chosen on the support set, never on the test


def test_supervised_contrastive_prefers_tight_classes():
    labels = torch.tensor([0, 0, 1, 1])
    tight = F.normalize(torch.tensor([[1.0, 0.01], [1.0, -0.01], [-1.0, 0.01], [-1.0, -0.01]]), dim=-1)
    mixed = F.normalize(torch.tensor([[1.0, 0.01], [-1.0, 0.0], [1.0, -0.01], [-1.0, -0.01]]), dim=-1)
    assert supervised_contrastive(tight, labels, 0.1) < supervised_contrastive(mixed, labels, 0.1)
    assert supervised_contrastive(tight, torch.tensor([0, 1, 2, 3]), 0.1) == 0  # no positives: no loss


# ---------------------------------------------------------------------------------------------------
# End to end on a plain open_clip export


@pytest.fixture(scope="module")
def open_clip_export(tmp_path_factory) -> Path:
    """A stock open_clip architecture (ViT-B-32's layout) at a tiny width, random init, saved in the
    Hugging Face hub layout: no dalip file at all."""
    import open_clip
    import safetensors.torch

    cfg = open_clip.get_model_config("ViT-B-32")
    cfg = {**cfg, "embed_dim": 32, "vision_cfg": {**cfg["vision_cfg"], "image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
           "text_cfg": {**cfg["text_cfg"], "width": 32, "heads": 2, "layers": 2}}  # fmt: skip
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    out = tmp_path_factory.mktemp("export")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    pre = {"size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    return out


def _folder(root: Path, classes=CLASSES[:4], per_class=6, duplicates=True) -> Path:
    rng = random.Random(1)
    for colour, shape in classes:
        folder = root / f"{colour}_{shape}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            shape_image(colour, shape, rng).save(folder / f"{j}.png")
        if duplicates:  # the same bytes under two names: must never be split between support and test
            (folder / "copy_of_0.png").write_bytes((folder / "0.png").read_bytes())
    return root


def _run(argv, monkeypatch, capsys) -> tuple[int, str]:
    from dalip.cli import main

    monkeypatch.setattr(sys, "argv", ["dalip", *map(str, argv)])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def test_adapt_on_a_plain_open_clip_export(open_clip_export, tmp_path, monkeypatch, capsys):
    assert sorted(p.name for p in open_clip_export.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    data = _folder(tmp_path / "shapes")
    out = tmp_path / "out"
    code, err = _run(["adapt", open_clip_export, "--dataset", data, "--shots", "1,2", "--folds", "3", "--out", out], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "adapt.json").read_text())
    assert report["model"]["kind"] == "open_clip-export" and report["num_classes"] == 4
    assert set(report["results"]) == set(METHODS)
    for by_shot in report["results"].values():
        for entry in by_shot.values():
            assert len(entry["per_fold"]) == 3 and entry["mean"] == pytest.approx(sum(entry["per_fold"]) / 3)
    assert (out / "adapt.png").stat().st_size > 0 and "| Chance | 25.0 | 25.0 |" in (out / "adapt.md").read_text()
    assert list((out / "features").glob("*.pt"))

    # No support image is in the test split, by content; copies travel together.
    splits = json.loads((out / "splits.json").read_text())
    test = set(splits["test"])
    for fold in splits["folds"]:
        for support in fold.values():
            assert test.isdisjoint(support)
    assert len(splits["folds"][0]["2"]) == 8 and set(splits["folds"][0]["1"]) <= set(splits["folds"][0]["2"])

    # Folds are reproducible by seed (from the feature cache), and another seed draws others.
    again = tmp_path / "again"
    code, err = _run(["adapt", open_clip_export, "--dataset", data, "--shots", "1,2", "--folds", "3", "--out", again], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((again / "splits.json").read_text()) == splits
    assert json.loads((again / "adapt.json").read_text())["results"] == report["results"]
    other = tmp_path / "other"
    code, err = _run(["adapt", open_clip_export, "--dataset", data, "--shots", "1,2", "--folds", "3", "--seed", "1",
                      "--methods", "zero-shot", "--out", other], monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((other / "splits.json").read_text()) != splits


def test_adapt_with_an_explicit_test_split_drops_its_images_from_the_pool(open_clip_export, tmp_path, monkeypatch, capsys):
    data = _folder(tmp_path / "train", duplicates=False)
    test = tmp_path / "test"
    for folder in sorted(data.iterdir()):  # the test set reuses two images of every class
        (test / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:2]:
            (test / folder.name / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    code, err = _run(["adapt", open_clip_export, "--dataset", data, "--test", test, "--shots", "4", "--folds", "2",
                      "--methods", "zero-shot,tip", "--out", out], monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "adapt.json").read_text())
    assert report["test"]["removed_from_pool"] == 8 and report["pool_size"] == 16 and report["test_size"] == 8
    splits = json.loads((out / "splits.json").read_text())
    assert all(set(splits["test"]).isdisjoint(fold["4"]) for fold in splits["folds"])


def test_adapt_errors_are_one_line(open_clip_export, tmp_path, monkeypatch, capsys):
    data = _folder(tmp_path / "shapes", per_class=3, duplicates=False)
    one = _folder(tmp_path / "one", classes=CLASSES[:1], duplicates=False)
    cases = [
        (["--dataset", one], "has 1 class; few-shot classification needs at least 2"),
        (["--dataset", data, "--shots", "1,4"], "--shots 4 exceeds the smallest class of the support pool"),
        (["--dataset", data, "--methods", "zero-shot,coop"], "unknown method 'coop'; choose from zero-shot, linear-probe"),
        (["--dataset", data, "--features", "second"], "no second-order (MBDC)"),
    ]
    for extra, message in cases:
        code, err = _run(["adapt", open_clip_export, *extra, "--out", tmp_path / "out"], monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, err)
        assert "Traceback" not in err


def test_eval_on_a_plain_open_clip_export_scores_first_order(open_clip_export, tmp_path, monkeypatch, capsys):
    data = _folder(tmp_path / "shapes", duplicates=False)
    out = tmp_path / "eval"
    code, err = _run(["eval", open_clip_export, "--imagefolder", data, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    kept = list(out.glob("model_*/results.json"))
    assert len(kept) == 1  # no checkpoint step: kept under the model's fingerprint
    results = json.loads(kept[0].read_text())
    shapes = results["zero_shot"]["shapes"]
    assert set(shapes["per_class"]) == {"first"} and "second" not in shapes and "top5" not in shapes["first"]
    table = (out / "results.md").read_text().splitlines()
    assert [line.split(" |")[0] for line in table[2:]] == [f"| {results['label']} (first-order)", "| Chance"]
