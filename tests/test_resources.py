"""The recipe's `resources:` section: validated, applied to DuckDB, and never part of what is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from plantmix.core.duck import connect, spill_dir
from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import Recipe, ResourcesConfig, load_recipe

BASE = {"name": "t", "sources": [{"name": "s", "domain": "plant", "format": "url_list", "path": "x.csv"}]}


def test_duckdb_gets_threads_memory_limit_and_spill_dir(tmp_path):
    con = connect(ResourcesConfig(threads=1, memory_limit="512MB"), tmp_path / "spill")
    settings = dict(con.execute(
        "SELECT name, value FROM duckdb_settings() WHERE name IN ('threads', 'memory_limit', 'temp_directory')"
    ).fetchall())
    assert settings["threads"] == "1"
    assert settings["memory_limit"] in ("488.2 MiB", "512.0 MB", "488.2MiB")  # DuckDB prints it its own way
    assert Path(settings["temp_directory"]) == tmp_path / "spill" and (tmp_path / "spill").is_dir()


def test_spill_dir_defaults_inside_the_build(tmp_path):
    assert spill_dir(ResourcesConfig(), tmp_path) == tmp_path / ".spill"
    assert spill_dir(ResourcesConfig(spill_dir="tmp/x"), tmp_path) == tmp_path / "tmp" / "x"
    assert spill_dir(ResourcesConfig(spill_dir="/scratch/x"), tmp_path) == Path("/scratch/x")


def test_resources_do_not_change_the_recipe_hash():
    a = Recipe.model_validate(BASE)
    b = Recipe.model_validate({**BASE, "resources": {"threads": 8, "memory_limit": "20GB", "workers": 6}})
    assert a.hash() == b.hash()
    assert a.hash() != Recipe.model_validate({**BASE, "filters": {"caption_max_foreign_letter_ratio": 0.1}}).hash()


@pytest.mark.parametrize("resources, field", [({"memory_limit": "lots"}, "resources.memory_limit"),
                                              ({"threads": 0}, "resources.threads"),
                                              ({"batch_rows": 10}, "resources.batch_rows"),
                                              ({"thread": 2}, "resources.thread")])
def test_bad_resources_fail_with_one_line(tmp_path, resources, field):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "resources": resources}))
    with pytest.raises(PlantmixError, match=rf"field '{field}'") as e:
        load_recipe(path)
    assert "\n" not in str(e.value)


def test_mix_uses_the_resources_the_build_was_made_with(tmp_path):
    from plantmix.build import write_lock
    from plantmix.mix.run import build_resources

    assert build_resources(tmp_path) == ResourcesConfig()
    write_lock(Recipe.model_validate({**BASE, "resources": {"memory_limit": "1GB", "batch_rows": 2000}}), tmp_path)
    assert build_resources(tmp_path) == ResourcesConfig(memory_limit="1GB", batch_rows=2000)
