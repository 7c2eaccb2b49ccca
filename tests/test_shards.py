"""Shard writing end to end on a synthetic build: reproducibility, nesting, open_clip's trainer,
verify, crash/resume, the dataset card and the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from typer.testing import CliRunner

from locking import wait_for_holder
from mixbuild import make_build
from plantmix.cli import app
from plantmix.core.errors import PlantmixError
from plantmix.mix.run import run_mix
from plantmix.mix.spec import make_spec

PY = sys.executable
PLANTMIX = str(Path(sys.executable).with_name("plantmix"))
SPEC = dict(ratio=0.77, total=200, seed=1, per_taxon_cap=100, shard_size=30)


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def mix_dir(build) -> Path:
    return run_mix(build, make_spec(name="m77", **SPEC), recipe_hash="r123")


def test_identical_input_gives_identical_mix_and_shards(tmp_path, build, mix_dir):
    twin = make_build(tmp_path / "twin")  # same rows and image bytes; download tars differ in mtimes
    other = run_mix(twin, make_spec(name="m77", **SPEC), recipe_hash="r123", workers=2)
    assert pq.read_table(other / "manifest.parquet").equals(pq.read_table(mix_dir / "manifest.parquet"))
    assert files(other / "shards") == files(mix_dir / "shards")
    assert (other / "dataset.json").read_bytes() == (mix_dir / "dataset.json").read_bytes()

    info = json.loads((mix_dir / "dataset.json").read_text())
    assert info["counts"]["domain"] == {"plant": round(0.77 * 200), "general": 200 - round(0.77 * 200)}
    assert list(info["counts"]["shard"].values()) == [30] * 6 + [20]
    assert json.loads((mix_dir / "shards" / "sizes.json").read_text()) == info["counts"]["shard"]
    assert info["recipe_hash"] == "r123" and info["versions"]["webdataset"] == wds.__version__

    before = {p.name: p.stat().st_mtime_ns for p in (mix_dir / "shards").iterdir()}
    run_mix(build, make_spec(name="m77", **SPEC), recipe_hash="r123")  # finished: a no-op
    assert {p.name: p.stat().st_mtime_ns for p in (mix_dir / "shards").iterdir()} == before


def test_smaller_mix_is_a_subset_and_shards_are_shuffled(build, mix_dir):
    small = run_mix(build, make_spec(name="m77-small", **{**SPEC, "total": 80}))
    uids = lambda d: set(pq.read_table(d / "manifest.parquet", columns=["uid"])["uid"].to_pylist())  # noqa: E731
    assert uids(small) < uids(mix_dir)
    first = pq.read_table(mix_dir / "shards" / "00000.parquet").to_pylist()
    assert {r["domain"] for r in first} == {"plant", "general"}  # domains are interleaved, not blocked
    assert {r["source"] for r in first} == {"plant_a", "plant_b", "web"}


def test_shards_hold_images_captions_and_metadata(build, mix_dir):
    manifest = {r["uid"]: r for r in pq.read_table(mix_dir / "manifest.parquet").to_pylist()}
    originals = {}
    for tar in {r["shard"] for r in manifest.values()}:
        with tarfile.open(build / tar) as src:
            originals.update({(tar, m.name): src.extractfile(m).read() for m in src if m.name.endswith(".jpg")})
    urls = [str(p) for p in sorted((mix_dir / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 200 and len({s["__key__"] for s in samples}) == 200
    for s in samples:
        meta = json.loads(s["json"])
        row = manifest[meta["uid"]]
        assert s["__key__"] == row["mix_key"] == meta["key"]
        assert s["txt"].decode() == row["caption"] == meta["caption"]
        assert meta["license"] == row["license"] and meta["source"] == row["source"]
        assert s["jpg"] == originals[row["shard"], f"{row['key']}.jpg"]
        if row["domain"] == "plant":
            assert meta["taxonomy"]["species"] == row["taxon_species"]
            assert meta["caption_common"] == row["caption_common"]
    with tarfile.open(mix_dir / "shards" / "00000.tar") as tf:
        m = tf.getmembers()
        assert {(x.mtime, x.uid, x.gid, x.uname, x.gname) for x in m} == {(0, 0, 0, "", "")}
        names = [x.name for x in m]
        assert names[:3] == sorted(names[:3]) and names[0].endswith(".jpg")


def test_repeats_and_caption_field(build):
    d = run_mix(build, make_spec(plant=10, general=150, allow_repeat=True, caption_field="caption_common", shard_size=64))
    t = pq.read_table(d / "manifest.parquet").to_pylist()
    general = [r for r in t if r["domain"] == "general"]
    assert all(r["mix_key"] == f"{r['uid']}-{r['mix_repeat']}" for r in general)
    assert max(r["mix_repeat"] for r in general) == 1 and len({r["mix_key"] for r in t}) == 160
    assert all(r["mix_key"] == r["uid"] for r in t if r["domain"] == "plant")
    shard = pq.read_table(d / "shards" / "00000.parquet").to_pylist()
    assert {r["caption"] for r in shard if r["domain"] == "plant"} <= {r["caption_common"] for r in t}
    assert json.loads((d / "dataset.json").read_text())["repeated_samples"] == sum(r["mix_repeat"] > 0 for r in t)


def test_dataset_card(mix_dir):
    card = (mix_dir / "README.md").read_text()
    for heading in ("## Funnel of the build", "## Composition", "### Top taxa", "## Licences"):
        assert heading in card
    assert "r123" in card and "| kept | kept |" in card and "CC-BY-4.0" in card
    for png in re.findall(r"\]\(([^)]+\.png)\)", card):
        assert (mix_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_passes_then_catches_truncation_and_tampering(tmp_path, mix_dir):
    shards = tmp_path / "shards"
    shutil.copytree(mix_dir / "shards", shards)
    shutil.copy(mix_dir / "dataset.json", tmp_path / "dataset.json")
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(shards), "--workers", "2"])
    assert ok.exit_code == 0, ok.output
    assert "200 samples in 7 shards" in ok.output

    with tarfile.open(shards / "00001.tar") as tf:
        victim = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
    with open(shards / "00001.tar", "r+b") as f:  # change one byte inside the image, keep the size
        f.seek(victim.offset_data + victim.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    size = (shards / "00004.tar").stat().st_size
    with open(shards / "00004.tar", "r+b") as f:
        f.truncate(size // 2 + 100)

    bad = runner.invoke(app, ["verify", str(shards)])
    assert bad.exit_code == 1
    key = victim.name.split(".")[0]
    assert re.search(rf"00001\.tar: sample '{key}': image sha256 differs", bad.output)
    assert re.search(r"00004\.tar: .*(truncated|dataset.json says 30)", bad.output)
    assert "FAILED" in bad.output


def test_sigkill_mid_shard_then_resume_matches_uninterrupted(tmp_path, mix_dir):
    build = make_build(tmp_path / "b")
    killer = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import webdataset as wds
from plantmix.mix.run import run_mix
from plantmix.mix.spec import make_spec
write, calls = wds.TarWriter.write, [0]
def write_then_die(self, obj):
    calls[0] += 1
    if calls[0] == 75:  # inside the third shard of 30
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, obj)
wds.TarWriter.write = write_then_die
run_mix({str(tmp_path / 'b')!r}, make_spec(name="m77", **{SPEC!r}), recipe_hash="r123")
"""
    proc = subprocess.run([PY, "-c", killer], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    shards = tmp_path / "b" / "mixes" / "m77" / "shards"
    assert sorted(p.name for p in shards.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert any(".tmp-" in p.name for p in shards.iterdir())  # the half-written third shard

    args = ["mix", str(tmp_path / "b"), "--name", "m77", "--ratio", "0.77", "--total", "200", "--seed", "1",
            "--per-taxon-cap", "100", "--shard-size", "30"]  # fmt: skip
    rerun = subprocess.run([PLANTMIX, *args], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert files(shards) == files(mix_dir / "shards")  # same bytes, no temporaries left
    # the CLI carries no recipe hash: only that field of dataset.json differs
    resumed, reference = (json.loads((d.parent / "dataset.json").read_text()) for d in (shards, mix_dir / "shards"))
    assert {k for k in reference if resumed[k] != reference[k]} == {"recipe_hash"}


def test_cli_mix_errors_are_one_line(tmp_path, build):
    short = subprocess.run([PLANTMIX, "mix", str(build), "--plant", "5", "--general", "5000"], capture_output=True, text=True)
    assert short.returncode == 2
    assert re.fullmatch(r"error: .*domain 'general' needs 5000 rows but only \d+ are available.*\n", short.stderr)
    runner = CliRunner()
    weight = runner.invoke(app, ["mix", str(build), "--plant", "5", "--source-weight", "plant_a"])
    assert isinstance(weight.exception, PlantmixError) and "SRC=W" in str(weight.exception)
    missing = runner.invoke(app, ["mix", str(tmp_path), "--plant", "5"])
    assert isinstance(missing.exception, PlantmixError) and "manifest.parquet: not found" in str(missing.exception)
    assert not (tmp_path / "mixes").exists()


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.mark.slow
def test_open_clip_trainer_reads_the_shards(tmp_path, mix_dir):
    """open_clip's own trainer (open_clip_train.main), CPU, a tiny random-init model, a few steps."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "plantmix-tiny.json").write_text(json.dumps(TINY_CLIP))
    # `python -m open_clip_train.main`, after registering our model config directory with open_clip
    launcher = (
        "import runpy, sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
        "sys.argv[0] = 'open_clip_train.main'; runpy.run_module('open_clip_train.main', run_name='__main__', alter_sys=True)"
    )
    info = json.loads((mix_dir / "dataset.json").read_text())
    cmd = [
        PY, "-c", launcher, str(tmp_path / "configs"), "--model", "plantmix-tiny",
        "--train-data", str(mix_dir / info["train_data"]), "--dataset-type", "webdataset",
        "--train-num-samples", "64", "--batch-size", "8", "--epochs", "1", "--workers", "1",
        "--lr", "1e-4", "--warmup", "1", "--precision", "fp32", "--save-frequency", "0",
        "--logs", str(tmp_path / "logs"), "--name", "run", "--log-every-n-steps", "1", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([-\d.naninf]+)", log)]
    assert len(losses) >= 8 and all(math.isfinite(x) for x in losses)
    assert "Handling webdataset error" not in log


# ---- concurrent mixes, self-repair, provenance -----------------------------------------------------

CLI_ARGS = ["--name", "m77", "--ratio", "0.77", "--total", "200", "--seed", "1", "--per-taxon-cap", "100", "--shard-size", "30"]


def mix_files(d: Path) -> dict[str, bytes]:
    """Every file of a mix (markers included) but its lock, by path relative to the mix."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def build_copy(build: Path, dest: Path, recipe_hash: str = "r123") -> Path:
    """A copy of the module's build (no mixes) with a recipe.lock.yaml naming `recipe_hash`."""
    shutil.copytree(build, dest, ignore=shutil.ignore_patterns("mixes"))
    (dest / "recipe.lock.yaml").write_text(f"recipe_hash: {recipe_hash}\nrecipe: {{}}\n")
    return dest


def plantmix(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PLANTMIX, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_rerun_repairs_exactly_the_damage_and_ends_byte_identical(tmp_path, build, mix_dir):
    b = build_copy(build, tmp_path / "b")
    first = plantmix("mix", str(b), *CLI_ARGS)
    assert first.returncode == 0, first.stderr
    mix = b / "mixes" / "m77"
    original = mix_files(mix)
    assert {k: v for k, v in original.items() if k.startswith("shards/")} == {
        f"shards/{k}": v for k, v in files(mix_dir / "shards").items()
    }  # the recipe hash now comes from the build's lock file: the same mix as run_mix(recipe_hash="r123")
    assert json.loads((mix / "dataset.json").read_text())["recipe_hash"] == "r123"

    shards = mix / "shards"
    untouched = {p.name: p.stat().st_mtime_ns for p in shards.glob("0*") if not p.name.startswith(("00002.", "00004."))}
    (shards / "00002.tar").unlink()
    with open(shards / "00004.tar", "r+b") as f:
        f.truncate(5000)
    (mix / "dataset.json").write_text('{"samples": 1}\n')
    rerun = plantmix("mix", str(b), *CLI_ARGS)
    assert rerun.returncode == 0, rerun.stderr
    assert "redoing" in rerun.stderr and "shards/00002.tar" in rerun.stderr and "dataset.json" in rerun.stderr
    assert mix_files(mix) == original
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in shards.iterdir()) if n in untouched} == untouched
    assert plantmix("verify", str(shards)).returncode == 0

    # a change the markers cannot see (same size, mtime put back) is found by verify and fixed by --repair
    with tarfile.open(shards / "00001.tar") as tf:
        victim = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
    stat = (shards / "00001.tar").stat()
    with open(shards / "00001.tar", "r+b") as f:
        f.seek(victim.offset_data + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shards / "00001.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert plantmix("verify", str(shards)).returncode == 1
    repaired = plantmix("verify", str(shards), "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert mix_files(mix) == original


@pytest.mark.slow
def test_a_mix_of_an_existing_name_with_other_inputs_needs_force(tmp_path, build):
    b = build_copy(build, tmp_path / "b")
    assert plantmix("mix", str(b), *CLI_ARGS).returncode == 0
    other = [*CLI_ARGS[:3], "0.5", "--total", "100", *CLI_ARGS[6:]]
    refused = plantmix("mix", str(b), *other)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert re.fullmatch(r"error: .*a mix named 'm77' exists with other inputs \(ratio 0\.77 → 0\.5; total 200 → 100\); pass --force.*\n", refused.stderr)
    forced = plantmix("mix", str(b), *other, "--force")
    assert forced.returncode == 0, forced.stderr
    info = json.loads((b / "mixes" / "m77" / "dataset.json").read_text())
    assert info["requested"]["ratio"] == 0.5 and info["num_shards"] == 4
    assert sorted(p.name for p in (b / "mixes" / "m77" / "shards").glob("*.tar")) == [f"0000{i}.tar" for i in range(4)]

    # the build manifest rewritten (a rebuild): the mix made from the old one is not silently replaced
    t = pq.read_table(b / "manifest.parquet")
    pq.write_table(t.slice(0, t.num_rows - 1), b / "manifest.parquet", row_group_size=100)
    stale = plantmix("mix", str(b), *other)
    assert stale.returncode == 2 and "the build manifest changed since" in stale.stderr


@pytest.mark.slow
def test_two_concurrent_mixes_of_one_name_the_second_refuses(tmp_path, build, mix_dir):
    b = build_copy(build, tmp_path / "b")
    slow = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import webdataset as wds
from plantmix.mix.run import run_mix
from plantmix.mix.spec import make_spec
write = wds.TarWriter.write
def slow_write(self, obj):
    time.sleep(0.02)
    return write(self, obj)
wds.TarWriter.write = slow_write
run_mix({str(b)!r}, make_spec(name="m77", **{SPEC!r}), recipe_hash="r123")
"""
    holder = subprocess.Popen([PY, "-c", slow], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_holder(b / "mixes" / "m77" / ".lock", holder)
        second = plantmix("mix", str(b), *CLI_ARGS)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert re.fullmatch(rf"error: .*m77: another plantmix mix is running here \(pid {holder.pid} on .+, started .+\); wait.*\n", second.stderr)
        out, err = holder.communicate(timeout=300)
    finally:
        holder.kill()
    assert holder.returncode == 0, err
    mix = b / "mixes" / "m77"
    assert files(mix / "shards") == files(mix_dir / "shards")
    assert (mix / "dataset.json").read_bytes() == (mix_dir / "dataset.json").read_bytes()
    # the holder is gone: its lock is free again and a rerun is a no-op
    assert plantmix("mix", str(b), *CLI_ARGS).returncode == 0


def test_the_build_mix_stage_skips_intact_mixes_repairs_damaged_ones_and_follows_the_recipe(tmp_path, build):
    import contextlib

    from rich.console import Console

    from plantmix.build import BuildContext
    from plantmix.core.recipe import Recipe
    from plantmix.core.stage import run_stage
    from plantmix.mix.steps import mix_stage

    b = build_copy(build, tmp_path / "b")
    entry = {"name": "m77", **SPEC}
    recipe = Recipe.model_validate({"name": "r", "sources": [{"name": "s", "domain": "plant", "format": "url_list", "path": "x.csv"}],
                                    "resources": {"workers": 1}, "mix": [entry]})  # fmt: skip

    def stage(r: Recipe):
        return run_stage(mix_stage(BuildContext(r, b, tmp_path, None, Console(file=io.StringIO()), contextlib.ExitStack())))

    assert stage(recipe).ran
    mix = b / "mixes" / "m77"
    original = mix_files(mix)
    assert json.loads((mix / "dataset.json").read_text())["recipe_hash"] == recipe.hash()
    assert not stage(recipe).ran
    (mix / "shards" / "00003.tar").unlink()
    assert stage(recipe).ran and mix_files(mix) == original
    # the recipe's entry changed: the build replaces its own mix (no --force to give there)
    changed = recipe.model_copy(update={"mix": [recipe.mix[0].model_copy(update={"total": 100})]})
    assert stage(changed).ran and json.loads((mix / "dataset.json").read_text())["samples"] == 100
