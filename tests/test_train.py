"""The training loop on the tiny config: loss falls, bad data is skipped, accumulation is exact,
non-finite losses abort cleanly, mixed precision runs, user errors are one line."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from dalip.config import load_train_config
from dalip.errors import DalipError, NonFiniteLossError
from dalip.train import lr_at, param_groups, read_train_log, train

sys.path.insert(0, str(Path(__file__).parent))
from test_data import _corrupt_copy, write_shape_shards  # noqa: E402



# One intra-op thread: on a small shared CPU, more threads make these tiny models much slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shape_shards(tmp_path_factory.mktemp("shapes"), num_shards=4, per_shard=32)


def _cfg(shards: Path, runs: Path, name: str, **kw):
    values = dict(
        train_data=str(shards), name=name, runs_dir=str(runs), batch_size=16, steps=3, workers=0, lr=1e-3,
        warmup=2, deterministic=True, save_every=1000, log_every=5,
    )  # fmt: skip
    values.update(kw)
    return load_train_config(None, values)


def test_tiny_config_loss_falls(shards, tmp_path):
    cfg = _cfg(shards, tmp_path, "falls", steps=24)
    summary = train(cfg)
    losses = [r["loss"] for r in read_train_log(cfg.run_dir)]
    assert summary["step"] == 24 and len(losses) == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.2, losses
    # outputs: checkpoint (weights in safetensors), TensorBoard events, resolved config
    ckpt = cfg.run_dir / "checkpoints" / "step_00000024"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "state.pt").is_file()
    assert any((cfg.run_dir / "logs" / "tensorboard").iterdir())
    assert "train_data" in (cfg.run_dir / "config.yaml").read_text()


def test_corrupt_sample_and_truncated_shard_are_skipped(shards, tmp_path, caplog):
    bad = _corrupt_copy(shards, tmp_path / "bad")
    cfg = _cfg(bad, tmp_path, "bad", steps=9)  # 8 steps per epoch: the run passes every shard
    with caplog.at_level(logging.INFO):
        summary = train(cfg)
    rows = read_train_log(cfg.run_dir)
    assert summary["step"] == 9 and all(math.isfinite(r["loss"]) for r in rows)
    assert (rows[-1]["bad_samples"], rows[-1]["bad_shards"]) == (2, 1)
    assert "skipped: 2 samples, 1 shards" in caplog.text
    assert "unreadable shard" in caplog.text and "skipping sample" in caplog.text


def test_accumulation_matches_one_big_batch(shards, tmp_path):
    """The feature cache makes 2×8 accumulated samples one contrastive batch of 16."""
    no_dropout = {"dropout": 0.0}
    one = _cfg(shards, tmp_path, "one", steps=2, mbdc=no_dropout)
    two = _cfg(shards, tmp_path, "two", steps=2, mbdc=no_dropout, accum_steps=2)
    train(one)
    train(two)
    a, b = (read_train_log(c.run_dir) for c in (one, two))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_mixed_precision_and_grad_checkpointing_run(shards, tmp_path):
    for precision in ("bf16", "fp16"):
        cfg = _cfg(shards, tmp_path, precision, steps=2, precision=precision, grad_checkpointing=precision == "bf16")
        train(cfg)
        assert all(math.isfinite(r["loss"]) for r in read_train_log(cfg.run_dir))


def test_clip_baseline_freezes_mbdc(shards, tmp_path):
    cfg = _cfg(shards, tmp_path, "clip", steps=2, loss="clip", mbdc={"dropout": 0.0})
    train(cfg)
    ckpt = cfg.run_dir / "checkpoints" / "step_00000002" / "model.safetensors"
    from dalip.model import create_model

    torch.manual_seed(cfg.seed)
    fresh, *_ = create_model(cfg.model, mbdc=cfg.mbdc)
    trained = safetensors.torch.load_file(str(ckpt))
    assert torch.equal(trained["mbdc_image.proj.weight"], fresh.state_dict()["mbdc_image.proj.weight"])
    assert not torch.equal(trained["base.visual.proj"], fresh.state_dict()["base.visual.proj"])
    assert all(math.isnan(r["loss_second"]) for r in read_train_log(cfg.run_dir))


def test_nonfinite_loss_skips_steps_then_aborts(shards, tmp_path):
    """Base weights with a NaN give a NaN loss every step: each is skipped, then training stops."""
    from dalip.model import create_model

    model, *_ = create_model("dalip-tiny")
    weights = {k: v.clone() for k, v in model.base.state_dict().items()}
    weights["ln_final.weight"][0] = math.nan
    nan_weights = tmp_path / "nan.safetensors"
    safetensors.torch.save_file(weights, str(nan_weights))
    cfg = _cfg(shards, tmp_path, "nan", steps=10, pretrained=str(nan_weights), max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="not finite for 3 steps in a row"):
        train(cfg)
    rows = read_train_log(cfg.run_dir)
    assert [r["nonfinite"] for r in rows] == [1, 2, 3] and all(r["skipped"] == 1 for r in rows)


def test_schedule_and_weight_decay_groups():
    cfg = load_train_config(None, dict(train_data="x", lr=1.0, min_lr=0.1, warmup=10))
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    from dalip.model import create_model

    model, *_ = create_model("dalip-tiny")
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"base.logit_scale", "base.token_embedding.weight", "base.positional_embedding",
            "base.visual.class_embedding", "base.visual.ln_post.weight"} <= no_decay_names
    assert {n for n in names.values() if "norm" in n or n.endswith("bias")} <= no_decay_names
    assert {"base.visual.proj", "mbdc_image.proj.weight", "base.transformer.resblocks.0.mlp.c_fc.weight"} <= decay_names


def test_config_yaml_and_flags(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("train_data: a\nlr: 0.1\nbatch_size: 8\n")
    cfg = load_train_config(yml, {"lr": 0.2, "steps": None})
    assert (cfg.lr, cfg.batch_size, cfg.train_data) == (0.2, 8, "a")
    yml.write_text("train_data: a\nlearning_rate: 0.1\n")
    with pytest.raises(DalipError, match="learning_rate"):
        load_train_config(yml)
    with pytest.raises(DalipError, match="multiple of accum_steps"):
        load_train_config(None, {"train_data": "a", "batch_size": 10, "accum_steps": 4})


def test_cli_user_error_is_one_line(tmp_path, monkeypatch, capsys):
    from dalip.cli import main

    missing = tmp_path / "nowhere.tar"
    monkeypatch.setattr(sys, "argv", ["dalip", "train", "--train-data", str(missing), "--runs-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip() == f"error: shard not found: {missing}"


def test_augment_shapes_the_train_transform_and_changes_the_run(shards, tmp_path):
    from dalip.model import create_model

    aug = dict(scale=[0.5, 1.0], color_jitter=[0.4, 0.4, 0.4, 0.1], color_jitter_prob=0.8, gray_scale_prob=0.2)
    cfg = _cfg(shards, tmp_path, "aug", augment=aug)
    _, preprocess, _, _ = create_model(cfg.model, aug_cfg=cfg.augment.open_clip_cfg())
    text = str(preprocess)
    assert "scale=(0.5, 1.0)" in text and "color_jitter" in text and "gray_scale" in text
    train(cfg)
    train(_cfg(shards, tmp_path, "plain"))
    aug_loss = [r["loss"] for r in read_train_log(cfg.run_dir)]
    plain_loss = [r["loss"] for r in read_train_log(tmp_path / "plain")]
    assert aug_loss[0] != plain_loss[0]  # same seed and data: only the augmentation differs
    for bad, words in ((dict(scale=[0.9, 0.5]), "lower bound exceeds"), (dict(color_jitter=[0.1] * 4), "together")):
        with pytest.raises(DalipError, match=words):
            _cfg(shards, tmp_path, "bad", augment=bad)


def test_threads_sets_the_intra_op_threads_and_keeps_the_run(shards, tmp_path):
    base = torch.get_num_threads()  # 1 here (the one_torch_thread fixture)
    try:
        train(_cfg(shards, tmp_path, "two", threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(base)
    train(_cfg(shards, tmp_path, "default"))
    assert torch.get_num_threads() == base  # unset: left as it was
    two = [r["loss"] for r in read_train_log(tmp_path / "two")]
    default = [r["loss"] for r in read_train_log(tmp_path / "default")]
    assert two == pytest.approx(default, rel=1e-4)  # the same run, up to the order of float sums
    with pytest.raises(DalipError, match="threads"):
        _cfg(shards, tmp_path, "bad", threads=0)
