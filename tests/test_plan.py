"""The PlantMix-13M recipe, the source catalog and `plantmix build --dry-run`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from plantmix import plan
from plantmix.cli import app
from plantmix.core.recipe import Recipe, SourceConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "plantmix-13m.yaml"
CATALOG = sorted((ROOT / "manifests" / "catalog").glob("*.yaml"))


def test_catalog_entries_are_complete_source_configs():
    assert len(CATALOG) >= 6
    domains = set()
    for path in CATALOG:
        entry = yaml.safe_load(path.read_text())
        source = SourceConfig.model_validate(entry["source"])
        assert source.name == path.stem
        assert source.homepage and source.homepage.startswith("https://")
        assert source.expected_rows and source.license and source.attribution
        assert len(entry["prepare"].strip()) > 50  # how to obtain and convert the data
        if source.format == "url_list":
            assert "url" in source.columns
        domains.add(source.domain)
    assert domains == {"plant", "general"}


def test_recipe_sources_are_the_catalog_entries():
    recipe = load_recipe(RECIPE)
    catalog = {p.stem: SourceConfig.model_validate(yaml.safe_load(p.read_text())["source"]) for p in CATALOG}
    for source in recipe.sources:
        assert source == catalog[source.name], source.name
    assert {s.domain for s in recipe.sources} == {"plant", "general"}
    (mix,) = recipe.mix
    assert mix.counts() == {"plant": 10_000_000, "general": 3_000_000}


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path, monkeypatch):
    shutil.copy(RECIPE, tmp_path / "plantmix-13m.yaml")  # its source paths do not exist here
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["build", "plantmix-13m.yaml", "--dry-run"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("plantnet300k", "inat2021_plantae", "plantclef2022_trusted", "gbif_plantae_media", "cc12m", "datacomp_medium"):
        assert name in result.output
    assert "1,300 × 10,000" in result.output and "Assumptions:" in result.output
    assert "disk: total" in result.output and "time: total" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plantmix-13m.yaml"]


def test_plan_arithmetic_and_shortfall_warning():
    recipe = Recipe.model_validate(
        {
            "name": "small",
            "sources": [
                {"name": "p", "domain": "plant", "format": "url_list", "path": "p.csv", "expected_rows": 1000, "max_rows": 400},
                {"name": "g", "domain": "general", "format": "image_folder", "path": "g", "expected_rows": 100},
            ],
            "download": {"image_size": 256, "processes_count": 2},
            "mix": [{"ratio": 0.5, "total": 400, "shard_size": 150}],
        }
    )
    p = plan.make_plan(recipe)
    keep = plan.DEDUP_KEEP * plan.FILTER_KEEP
    assert p["candidates"] == 500
    assert p["kept"]["plant"] == pytest.approx(400 * plan.URL_SUCCESS * keep)
    assert p["kept"]["general"] == pytest.approx(100 * plan.LOCAL_SUCCESS * keep)
    (m,) = p["mixes"]
    assert m["shards"] == 3 and m["short"] == ["general"]
    assert p["image_bytes"] == pytest.approx(256**2 * plan.ASPECT_AREA * 2.0 / 8)
    assert p["time"]["download"] == pytest.approx(400 / (2 * plan.DOWNLOAD_PER_PROCESS) + 100 / (2 * plan.LOCAL_PER_PROCESS))
