"""Bad input gets one clear `error:` line and exit status 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """
name: t
sources:
  - name: s
    domain: plant
    format: {fmt}
    path: {path}
"""


def run_build(tmp_path: Path, recipe_text: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    return subprocess.run(
        [sys.executable, "-m", "plantmix.cli", "build", str(recipe), "--out", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=120,
    )


def check_one_line(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], p.stderr


def test_missing_recipe_field(tmp_path):
    p = run_build(tmp_path, RECIPE.format(fmt="url_list", path="u.csv").replace("    domain: plant\n", ""))
    check_one_line(p, "field 'sources.0.domain': Field required")


def test_unknown_source_format(tmp_path):
    p = run_build(tmp_path, RECIPE.format(fmt="zip", path="u.csv"))
    check_one_line(p, "field 'sources.0.format'")


def test_url_list_without_url_column(tmp_path):
    (tmp_path / "u.csv").write_text("link,caption\nhttp://x/1.jpg,a cat on a mat\n")
    p = run_build(tmp_path, RECIPE.format(fmt="url_list", path="u.csv"))
    check_one_line(p, "has no url column 'url' (columns: link, caption)")


@pytest.mark.parametrize("content", [b"\x00\xff\x00 not a parquet file", None])
def test_unreadable_file(tmp_path, content):
    if content is not None:
        (tmp_path / "u.parquet").write_bytes(content)
    p = run_build(tmp_path, RECIPE.format(fmt="url_list", path="u.parquet"))
    check_one_line(p, "u.parquet")


def test_missing_recipe(tmp_path):
    p = subprocess.run([sys.executable, "-m", "plantmix.cli", "build", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True, timeout=60)
    check_one_line(p, "recipe file not found")


def test_help_explains():
    p = subprocess.run([sys.executable, "-m", "plantmix.cli", "build", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--distributor" in p.stdout and "resumes" in p.stdout
