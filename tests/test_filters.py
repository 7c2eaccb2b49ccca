import pyarrow as pa
import pytest

from plantmix.curate.filters import apply_filters, caption_reason, image_reason
from plantmix.core.recipe import FilterConfig

CFG = FilterConfig(min_side=64, max_aspect_ratio=4, caption_min_words=2, caption_max_words=10, caption_scripts=["LATIN"])


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("a photo of Quercus robur.", None),
        ("una foto de un roble común", None),  # other Latin-script languages pass
        ("", "caption_empty"),
        ("   ", "caption_empty"),
        (None, "caption_empty"),
        ("IMG_2034.JPG", "caption_garbage"),
        ("DSC00012", "caption_garbage"),
        ("####!!!!", "caption_garbage"),
        ("photo.png", "caption_garbage"),
        ("橡树的叶子和果实的照片", "caption_script"),
        ("фотография листа дуба", "caption_script"),
        ("oak", "caption_too_short"),
        ("one two three four five six seven eight nine ten eleven", "caption_too_long"),
    ],
)
def test_caption_reasons(caption, reason):
    assert caption_reason(caption, CFG) == reason


def test_any_script_when_unconfigured():
    assert caption_reason("фотография листа дуба", FilterConfig()) is None


@pytest.mark.parametrize("w, h, reason", [(200, 100, None), (50, 200, "image_too_small"), (640, 90, "aspect_ratio"), (None, None, None)])
def test_image_reasons(w, h, reason):
    assert image_reason(w, h, CFG) == reason


def test_apply_filters_keeps_earlier_decisions():
    t = pa.table(
        {
            "keep": [True, True, False, True],
            "drop_reason": [None, None, "download_failed", None],
            "original_width": [200, 30, None, None],
            "original_height": [200, 30, None, None],
            "width": [200, 30, None, 640],
            "height": [200, 30, None, 90],
            "caption": ["a fine oak leaf", "a fine oak leaf", "", "wide image here"],
        }
    )
    out = apply_filters(t, CFG)
    assert out["keep"].to_pylist() == [True, False, False, False]
    assert out["drop_reason"].to_pylist() == [None, "image_too_small", "download_failed", "aspect_ratio"]
    assert out.num_rows == t.num_rows
