"""Ratio grids: one mix per ratio with exactly round(r·N) plant rows, nested across ratios, and a
guard that names the ratio at which a domain would repeat too often."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from plantmix.core.errors import PlantmixError
from plantmix.mix.grid import parse_ratios, run_grid

sys.path.insert(0, str(Path(__file__).parent))
from mixbuild import kept, make_build  # noqa: E402
from test_mixlaw import one_error_line, run_cli  # noqa: E402

RATIOS = [0.1, 0.3, 0.5, 0.7, 0.9]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("grid") / "b")


def uids(mix_dir: Path) -> dict[str, set[str]]:
    t = pq.read_table(mix_dir / "manifest.parquet", columns=["uid", "domain"]).to_pylist()
    return {d: {r["uid"] for r in t if r["domain"] == d} for d in ("plant", "general")}


def test_grid_mixes_nest_and_have_exact_counts(build):
    total = min(kept(build).values())  # the 0.1 and 0.9 ends both fit without repeats
    dirs = run_grid(build, RATIOS, total, seed=3, shard_size=25)
    assert [d.name for d in dirs] == [f"r{r:g}-n{total}-s3" for r in RATIOS]
    sets = [uids(d) for d in dirs]
    for r, s in zip(RATIOS, sets):
        assert len(s["plant"]) == round(r * total) and len(s["general"]) == total - round(r * total)
    for lower, higher in zip(sets, sets[1:]):
        assert lower["plant"] < higher["plant"] and higher["general"] < lower["general"]


def test_another_seed_is_another_nested_grid(build):
    total = min(kept(build).values())
    a, b = (uids(d) for d in run_grid(build, [0.3, 0.7], total, seed=11, shard_size=25))
    assert a["plant"] < b["plant"] and b["general"] < a["general"]
    assert a["plant"] != uids(build / "mixes" / f"r0.3-n{total}-s3")["plant"]


def test_guard_names_the_ratio_before_writing_anything(build, tmp_path):
    n_general = kept(build)["general"]
    total = 2 * n_general
    with pytest.raises(PlantmixError, match=r"ratio 0\.3: domain 'general' needs .* the limit is 1"):
        run_grid(build, [0.9, 0.3, 0.7], total, seed=5)
    assert not list((build / "mixes").glob(f"r*-n{total}-s5"))
    with pytest.raises(PlantmixError, match=r"ratio 0\.1: domain 'general' .* the limit is 1\.5"):
        run_grid(build, [0.1, 0.9], total, seed=5, allow_repeat=True, max_epochs=1.5)


def test_parse_ratios_errors():
    assert parse_ratios("0.1, 0.5,1") == [0.1, 0.5, 1.0]
    for text, needle in (("0.1,x", "expects a number"), ("0.2,1.2", "outside [0, 1]"), ("0.2,0.2", "listed twice")):
        with pytest.raises(PlantmixError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            parse_ratios(text)


def test_cli_ratio_grid(build, capsys, monkeypatch):
    total = min(kept(build).values())
    code, _, err = run_cli(["mix", build, "--ratio", "0.2,0.8", "--total", total, "--seed", 7, "--shard-size", 50], capsys, monkeypatch)
    assert code == 0, err
    assert (build / "mixes" / f"r0.2-n{total}-s7" / "dataset.json").is_file()
    assert (build / "mixes" / f"r0.8-n{total}-s7" / "dataset.json").is_file()
    code, _, err = run_cli(["mix", build, "--ratio", "0.2,abc", "--total", total], capsys, monkeypatch)
    one_error_line(code, err, "--ratio expects a number")
    code, _, err = run_cli(["mix", build, "--ratio", "0.2,0.4"], capsys, monkeypatch)
    one_error_line(code, err, "a ratio grid needs --total")
