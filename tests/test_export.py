"""`dalip export` writes a checkpoint that plain open_clip loads, with the trained model's embeddings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch

from dalip.config import load_train_config
from dalip.evaluate import load_for_eval
from dalip.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_shape_shards  # noqa: E402


def test_export_loads_in_open_clip_with_the_same_embeddings(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shards = write_shape_shards(tmp_path / "data", num_shards=2, per_shard=16)
        cfg = load_train_config(None, dict(train_data=str(shards), runs_dir=str(tmp_path), name="m", batch_size=16, steps=2, workers=0))
        train(cfg)

        from dalip.cli import main

        out = tmp_path / "export"
        monkeypatch.setattr(sys, "argv", ["dalip", "export", str(cfg.run_dir), "--out", str(out)])
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code == 0

        # What a user does: register the exported config, then let open_clip load the weights.
        open_clip.add_model_config(out / "dalip-tiny.json")
        base, _, preprocess = open_clip.create_model_and_transforms("dalip-tiny", pretrained=str(out / "open_clip_model.safetensors"))
        base.eval()
        trained, trained_preprocess, tokenizer, _ = load_for_eval(cfg.run_dir)

        images = torch.rand(4, 3, 32, 32)
        texts = tokenizer(["a photo of a red circle", "a blue square", "green", "a yellow triangle"])
        with torch.no_grad():
            z_image, _ = trained.encode_image(images)
            z_text, _ = trained.encode_text(texts)
            torch.testing.assert_close(base.encode_image(images, normalize=True), z_image)
            torch.testing.assert_close(base.encode_text(texts, normalize=True), z_text)
            # a fresh random init would not match: the weights really came from the export
            fresh = open_clip.create_model("dalip-tiny").eval()
            assert not torch.allclose(fresh.encode_image(images, normalize=True), z_image, atol=1e-3)
        assert str(preprocess) == str(trained_preprocess)

        mbdc = safetensors.torch.load_file(str(out / "mbdc.safetensors"))
        state = trained.state_dict()
        assert mbdc.keys() == {k for k in state if k.startswith("mbdc_")}
        assert all(torch.equal(mbdc[k], state[k]) for k in mbdc)
        info = json.loads((out / "dalip.json").read_text())
        assert info["arch"] == "dalip-tiny" and info["step"] == 2

        # eval and adapt read the export with both orders, equal to the trained model's
        from dalip.encoders import load_encoder

        encoder = load_encoder(out)
        assert encoder.second_order and encoder.info["kind"] == "dalip-export"
        with torch.no_grad():
            for got, want in zip(encoder.encode_image(images), trained.encode_image(images)):
                torch.testing.assert_close(got, want)
            for got, want in zip(encoder.encode_text(texts), trained.encode_text(texts)):
                torch.testing.assert_close(got, want)
    finally:
        torch.set_num_threads(threads)


def test_a_model_given_as_a_json_config_path_exports_under_its_stem(tmp_path):
    from dalip.export import export_checkpoint
    from dalip.model import MODEL_CONFIG_DIR

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = tmp_path / "configs" / "my-tiny.json"  # a path with "/" in it: the arch is the file's stem
        config.parent.mkdir()
        config.write_text((MODEL_CONFIG_DIR / "dalip-tiny.json").read_text())
        shards = write_shape_shards(tmp_path / "data", num_shards=1, per_shard=16)
        cfg = load_train_config(None, dict(train_data=str(shards), runs_dir=str(tmp_path), name="j", model=str(config),
                                           batch_size=16, steps=1, workers=0))  # fmt: skip
        train(cfg)
        export_checkpoint(cfg.run_dir, tmp_path / "export")
        assert json.loads((tmp_path / "export" / "dalip.json").read_text())["arch"] == "my-tiny"
        assert (tmp_path / "export" / "my-tiny.json").is_file()
    finally:
        torch.set_num_threads(threads)
