from pathlib import Path

import pytest

from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
name: t
sources:
  - name: s
    domain: plant
    format: url_list
    path: urls.csv
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_demo_recipe_is_valid():
    r = load_recipe(ROOT / "pipelines" / "demo.yaml")
    assert r.demo_world is not None and {s.domain for s in r.sources} == {"plant", "general"}


def test_hash_ignores_formatting(tmp_path):
    a = load_recipe(write(tmp_path, GOOD)).hash()
    b = load_recipe(write(tmp_path, GOOD.replace("name: t\n", "name: t\nseed: 0\n"))).hash()
    assert a == b
    c = load_recipe(write(tmp_path, GOOD.replace("name: t\n", "name: t\nseed: 1\n"))).hash()
    assert a != c


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD.replace("    domain: plant\n", ""), "field 'sources.0.domain'"),
        (GOOD.replace("format: url_list", "format: zip"), "field 'sources.0.format'"),
        (GOOD + "colour: red\n", "field 'colour'"),
        (GOOD + "dedup: {phash_radius: 99}\n", "field 'dedup.phash_radius'"),
        (GOOD.replace("path: urls.csv", "path: '{demo}/x.parquet'"), "no demo_world section"),
        ("name: t\nsources: [\n", "invalid YAML"),
        ("- just a list\n", "must be a YAML mapping"),
        (GOOD + "    columns: {link: URL}\n", "unknown target column"),
        (GOOD + "seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        (GOOD + "x: &a [1, 2]\ny: *a\n", "anchors and aliases"),
        (GOOD + "mix:\n  - {name: m, plant: 1}\n  - {name: m, general: 1}\n", "mix names must be unique; repeated: ['m']"),
    ],
)
def test_bad_recipe_one_clear_line(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(PlantmixError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(PlantmixError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    path = write(tmp_path, "!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(PlantmixError, match="invalid YAML"):
        load_recipe(path)
