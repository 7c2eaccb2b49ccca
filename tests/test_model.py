import json
import time

import open_clip
import pytest
import torch

from dalip import DalipError
from dalip.loss import DALIPLoss
from dalip.model import DALIP, create_model

CAPTIONS = ["a red maple leaf", "", "oak tree with broad lobed leaves and acorns on a branch"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, preprocess_train, preprocess_val, tokenizer = create_model("dalip-tiny", mbdc={"reduce_dim": 8})
    return model, preprocess_train, preprocess_val, tokenizer


def test_tiny_first_order_equals_open_clip(tiny):
    model, _, _, tokenizer = tiny
    model.eval()
    images, texts = torch.randn(3, 3, 32, 32), tokenizer(CAPTIONS)
    with torch.no_grad():
        z1_image, z2_image = model.encode_image(images)
        z1_text, z2_text = model.encode_text(texts)
        assert torch.equal(z1_image, model.base.encode_image(images, normalize=True))
        assert torch.equal(z1_text, model.base.encode_text(texts, normalize=True))
        raw_image, _ = model.encode_image(images, normalize=False)
        assert torch.equal(raw_image, model.base.encode_image(images))
    for z in (z2_image, z2_text):
        assert z.shape == (3, 64)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))


def test_text_tokens_anchor_and_mask(tiny):
    model, _, _, tokenizer = tiny
    texts = tokenizer(CAPTIONS)
    with torch.no_grad():
        _, tokens, anchor, valid = model.text_tokens(texts)
    eot = texts.argmax(dim=-1)
    assert torch.equal(anchor, eot)
    assert tokens.shape == (3, texts.shape[1], 64)
    assert valid.sum(dim=1).tolist() == (eot + 1).tolist()  # tokens up to and including EOT
    assert valid[1].sum() == 2  # empty caption: SOT and EOT


def test_text_second_order_ignores_padding_positions(tiny):
    """Tokens after EOT feed neither embedding: causal attention plus the MBDC mask."""
    model, _, _, tokenizer = tiny
    model.eval()
    texts = tokenizer(CAPTIONS[:1])
    changed = texts.clone()
    eot = int(texts.argmax())
    changed[0, eot + 1:] = 7  # junk ids below the EOT id, so the anchor stays put
    with torch.no_grad():
        a, b = model.encode_text(texts), model.encode_text(changed)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_forward_outputs(tiny):
    model, preprocess_train, preprocess_val, tokenizer = tiny
    model.train()
    out = model(torch.randn(2, 3, 32, 32), tokenizer(CAPTIONS[:2]))
    assert set(out) == {"image_features", "text_features", "image_features_2", "text_features_2", "logit_scale"}
    for key in ("image_features", "text_features", "image_features_2", "text_features_2"):
        assert out[key].shape == (2, 64)
    torch.testing.assert_close(out["logit_scale"], model.base.logit_scale.exp())
    assert callable(preprocess_train) and callable(preprocess_val)


def test_grad_checkpointing_gives_same_gradients(tiny):
    model, _, _, tokenizer = tiny
    model.eval()  # no dropout, so both passes see the same function
    images, texts = torch.randn(2, 3, 32, 32), tokenizer(CAPTIONS[:2])
    loss = DALIPLoss()

    def grads():
        model.zero_grad()
        loss(model(images, texts))[0].backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.set_grad_checkpointing(True)
    try:
        checkpointed = grads()
    finally:
        model.set_grad_checkpointing(False)
    assert model.base.visual.transformer.grad_checkpointing is False
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_forward(tiny):
    model, _, _, tokenizer = tiny
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32), tokenizer(CAPTIONS[:2]))
    for key in ("image_features_2", "text_features_2"):
        assert torch.isfinite(out[key]).all()
        torch.testing.assert_close(out[key].float().norm(dim=-1), torch.ones(2), atol=1e-2, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_low_precision_weights_train(precision):
    model, _, _, tokenizer = create_model("dalip-tiny", precision=precision, mbdc={"reduce_dim": 8})
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), tokenizer(CAPTIONS[:2]))
    total, _ = DALIPLoss()(out)
    total.backward()
    assert torch.isfinite(total)
    assert model.mbdc_image.proj.weight.grad is not None


def test_model_name_forms(tmp_path):
    config = open_clip.get_model_config("dalip-tiny")
    config["embed_dim"] = 32
    path = tmp_path / "my-tiny.json"
    path.write_text(json.dumps(config))
    model, _, _, tokenizer = create_model(str(path), mbdc={"reduce_dim": 4, "heads": 2})
    assert model.mbdc_image.embed_dim == 32 and model.mbdc_image.heads == 2
    assert tokenizer(["x"]).shape == (1, 32)
    other = tmp_path / "configs"
    other.mkdir()
    (other / "my-other.json").write_text(json.dumps(config))
    model, _, _, _ = create_model("my-other", model_config_path=str(other), mbdc={"reduce_dim": 4})
    assert isinstance(model, DALIP)


def test_bad_inputs_raise_dalip_error(tmp_path):
    with pytest.raises(DalipError, match="unknown model"):
        create_model("no-such-model")
    with pytest.raises(DalipError, match="not found"):
        create_model(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(DalipError, match="vision_cfg"):
        create_model(str(bad))
    with pytest.raises(DalipError, match="unknown option"):
        create_model("dalip-tiny", mbdc={"head": 2})
    with pytest.raises(DalipError, match="precision"):
        create_model("dalip-tiny", precision="fp8")


def test_resnet_tower_is_not_implemented(tmp_path):
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="ModifiedResNet"):
        create_model(str(path))


@pytest.mark.slow
def test_vit_b16_training_step_on_cpu():
    torch.manual_seed(0)
    start = time.perf_counter()
    model, _, _, tokenizer = create_model("ViT-B-16")
    model.train()
    images = torch.randn(2, 3, 224, 224)
    texts = tokenizer(["a photo of a fern", "a photo of a tulip"])
    with torch.no_grad():
        eval_model = model.eval()
        z1, _ = eval_model.encode_image(images)
        assert torch.equal(z1, model.base.encode_image(images, normalize=True))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.mbdc_image.proj.weight.detach().clone()
    total, parts = DALIPLoss()(model(images, texts))
    total.backward()
    optimizer.step()
    assert torch.isfinite(total) and set(parts) == {"loss_first", "loss_second", "total"}
    assert model.mbdc_text.out_proj.weight.grad is not None
    assert not torch.equal(before, model.mbdc_image.proj.weight)
    print(f"ViT-B-16 create + step: {time.perf_counter() - start:.1f} s")
