"""Hostile input to the `dalip` CLI (and the recipe / config loaders): every case ends with exit status
≠ 0 and exactly one `error:` line, no traceback — or, where the input is legal but misleading (a
one-class evaluation), a warning. Plus two concurrent `dalip train` on one run, and the help texts.

The sweep runs the CLIs in-process (`main()`, as the console scripts do); an exception escaping
`main()` fails the test with its traceback. One case per CLI also runs the real console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).parent))
from locking import wait_for_holder  # noqa: E402
from test_data import write_shape_shards  # noqa: E402
from test_eval import _imagefolder  # noqa: E402

DALIP = str(Path(sys.executable).with_name("dalip"))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A two-shard mix, a one-step tiny run on it, an image folder: what the cases break."""
    from dalip.config import load_train_config
    from dalip.train import train

    root = tmp_path_factory.mktemp("hostile")
    shards = write_shape_shards(root / "mix", num_shards=2, per_shard=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_train_config(None, dict(train_data=str(shards), runs_dir=str(root / "runs"), name="m", batch_size=16,
                                           steps=1, workers=0)))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    _imagefolder(root / "folder", per_class=2)
    return root


def run_main(main, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit status, stderr) of one in-process CLI call."""
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str, needle: str) -> str:
    assert code != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    return errors[0]


def dalip(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from dalip.cli import main

    return run_main(main, ["dalip", *args], monkeypatch, capsys)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- the sweep ----------------------------------------------------------------------------------

BOMB = "train_data: x\nmbdc:\n  a: &a [x, x, x, x, x, x, x, x, x]\n  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n  c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"


def _train_cases(w: Path) -> list[tuple[str, list[str], str]]:
    """(case, `dalip train` arguments, what the error line says)."""
    mix, runs = str(w / "mix"), str(w / "runs")
    base = ["--train-data", mix, "--runs-dir", runs, "--steps", "2", "--batch-size", "16", "--workers", "0"]
    return [
        ("device banana", [*base, "--name", "d", "--device", "banana"], "device: must be auto, cpu, cuda, cuda:N or mps"),
        ("run name escaping runs_dir", [*base, "--name", "../escape"], "name: must be a plain name"),
        ("lr inf flag", [*base, "--name", "i", "--lr", "inf"], "lr: Input should be a finite number"),
        ("lr inf yaml", ["--config", str(write(w / "inf.yaml", f"train_data: {mix}\nlr: .inf\n")), "--name", "i"], "lr: Input should be a finite number"),
        ("aliases", ["--config", str(write(w / "bomb.yaml", BOMB))], "anchors and aliases (&name, *name) are not allowed at line 3"),
        ("duplicate key", ["--config", str(write(w / "dup.yaml", f"train_data: {mix}\nlr: 0.1\nlr: 0.2\n"))], "duplicate key 'lr' at line 3"),
        ("mbdc unknown key", ["--config", str(write(w / "mbdc.yaml", f"train_data: {mix}\nmbdc: {{heads: 4, colour: red}}\n"))], "mbdc.colour: Extra inputs"),
        ("mbdc mistyped", ["--config", str(write(w / "mbdc2.yaml", f"train_data: {mix}\nmbdc: {{heads: four}}\n"))], "mbdc.heads: Input should be a valid integer"),
        ("mbdc dropout flag", [*base, "--name", "x", "--mbdc-dropout", "1.5"], "mbdc.dropout: Input should be less than 1"),
        ("count unbounded", [*base, "--name", "x", "--workers", "100000"], "workers: Input should be less than or equal to 256"),
        ("zero-byte state.pt", [*base, "--name", "zero", "--resume", "latest"], "state.pt: unreadable checkpoint state (empty file)"),
        ("pickled --pretrained", [*base, "--name", "p", "--pretrained", str(w / "pickle.pt")], "refused: the file holds pickled objects"),
        ("listed shard absent", [*base[:1], str(w / "holed"), *base[2:], "--name", "h"], "1 shard(s) listed in its sizes.json / dataset.json are absent (00001.tar)"),
        ("runs dir is a file", [*base[:2], "--runs-dir", str(w / "afile"), *base[4:], "--name", "f"], "afile/f: exists and is not a directory, or a parent of it is a file"),
    ]  # fmt: skip


def _break_things(w: Path) -> None:
    if not (w / "runs" / "zero").exists():
        shutil.copytree(w / "runs" / "m", w / "runs" / "zero")
        (w / "runs" / "zero" / "checkpoints" / "step_00000001" / "state.pt").write_bytes(b"")
        torch.save({"weights": torch.zeros(2), "hook": print}, w / "pickle.pt")  # a pickled function
        shutil.copytree(w / "mix", w / "holed")
        (w / "holed" / "shards" / "00001.tar").unlink()
        (w / "empty").mkdir()
        (w / "afile").write_text("x")
        (w / "notmine").mkdir()
        (w / "notmine" / "notes.txt").write_text("keep me")


def test_dalip_train_hostile_sweep(world, monkeypatch, capsys):
    _break_things(world)
    for case, args, needle in _train_cases(world):
        code, err = dalip(["train", *args], monkeypatch, capsys)
        one_error_line(code, err, needle)
        assert "weights_only" not in err, (case, err)  # never suggest loading a pickle with code
    assert not (world / "escape").exists() and not (world / "runs" / "i").exists()


def test_dalip_eval_and_export_hostile_sweep(world, monkeypatch, capsys):
    _break_things(world)
    run = str(world / "runs" / "m")
    cases = [
        ("empty eval folder", ["eval", run, "--imagefolder", str(world / "empty")], "dataset empty"),
        ("eval: listed shard absent", ["eval", run, "--validation", f"name=v,shards={world / 'holed' / 'shards'},domain=plant"], "are absent (00001.tar)"),
        ("eval: dataset name escaping", ["eval", run, "--dataset", f"name=../x,path={world / 'folder'}"], "name: must be a plain name"),
        ("eval: label escaping", ["eval", run, "--imagefolder", str(world / "folder"), "--label", "../x"], "--label: must be a plain name"),
        ("eval: duplicate key", ["eval", run, "--config", str(write(world / "evaldup.yaml", "alpha: 0.5\nalpha: 0.7\n"))], "duplicate key 'alpha'"),
        ("eval: device banana", ["eval", run, "--imagefolder", str(world / "folder"), "--device", "banana"], "device: must be auto"),
        ("export into a file", ["export", run, "--out", str(world / "afile")], "exists and is not a directory"),
        ("export into a non-empty dir", ["export", run, "--out", str(world / "notmine")], "not empty and not an earlier dalip export"),
        ("eval into a file", ["eval", run, "--imagefolder", str(world / "folder"), "--out", str(world / "afile")], "afile: exists and is not a directory"),
        ("adapt into a file", ["adapt", run, "--dataset", str(world / "folder"), "--shots", "1", "--folds", "1", "--methods", "zero-shot",
                               "--out", str(world / "afile")], "afile: exists and is not a directory"),
    ]  # fmt: skip
    for case, args, needle in cases:
        one_error_line(*dalip(args, monkeypatch, capsys), needle)
    assert sorted(p.name for p in (world / "notmine").iterdir()) == ["notes.txt"]  # untouched
    assert not (world / "x").exists()


def test_the_console_scripts_print_one_line(world):
    """The real entry points, once each: status 2, one line, nothing else on stderr."""
    _break_things(world)
    p = subprocess.run([DALIP, "train", "--train-data", str(world / "mix"), "--device", "banana"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr == "error: flags: device: must be auto, cpu, cuda, cuda:N or mps (got 'banana')\n", p.stderr


def test_one_class_eval_warns_and_reports_chance_100(world, monkeypatch, capsys, caplog):
    one = world / "one"
    if not one.exists():
        shutil.copytree(world / "folder" / sorted(p.name for p in (world / "folder").iterdir() if p.is_dir())[0], one / "only")
    code, err = dalip(["eval", str(world / "runs" / "m"), "--imagefolder", str(one), "--out", str(world / "one_out")], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((world / "one_out" / "results.json").read_text())
    assert results["zero_shot"]["one"]["chance"] == 1.0
    warning = results["zero_shot"]["one"]["warning"]
    assert "one class: top-1 is 100 % by construction" in warning
    assert any(warning in r.getMessage() for r in caplog.records) or warning in err


def test_eval_results_are_kept_per_checkpoint_and_checkpoints_record_the_mix(world, monkeypatch, capsys):
    run = world / "runs" / "m"
    meta = json.loads((run / "checkpoints" / "step_00000001" / "meta.json").read_text())
    card = json.loads((world / "mix" / "dataset.json").read_text())
    assert meta["train_data"][0]["mix_fingerprint"] == card["mix_fingerprint"]
    assert meta["mbdc"] == {"heads": 4, "reduce_dim": 46, "dropout": 0.5, "learnable_temperature": False, "hidden_linear": False}
    out = world / "kept"
    for _ in range(2):
        assert dalip(["eval", str(run), "--imagefolder", str(world / "folder"), "--out", str(out)], monkeypatch, capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "step_00000001"]


# ---- two trainings on one run -------------------------------------------------------------------


def _train_cmd(w: Path, name: str, steps: int = 6) -> list[str]:
    return [DALIP, "train", "--train-data", str(w / "mix"), "--runs-dir", str(w / "runs"), "--name", name,
            "--batch-size", "8", "--steps", str(steps), "--workers", "0", "--deterministic", "--no-progress",
            "--save-every", "100", "--log-every", "100"]  # fmt: skip


@pytest.mark.slow
def test_two_trainings_on_one_run_the_second_refuses(world):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_train_cmd(world, "twice"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_holder(world / "runs" / "twice" / ".lock", first)
        second = subprocess.run(_train_cmd(world, "twice"), capture_output=True, text=True, timeout=300, env=env)
        _, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"twice: another dalip train is running here (pid {first.pid} on " in errors[0], second.stderr
    assert first.returncode == 0, err

    solo = subprocess.run(_train_cmd(world, "solo"), capture_output=True, text=True, timeout=600, env=env)
    assert solo.returncode == 0, solo.stderr
    weights = [safetensors.torch.load_file(world / "runs" / n / "checkpoints" / "step_00000006" / "model.safetensors") for n in ("twice", "solo")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    logs = [(world / "runs" / n / "logs" / "train.csv").read_text().splitlines() for n in ("twice", "solo")]
    assert len(logs[0]) == len(logs[1]) == 7  # header + one row per step: the refused run wrote nothing


# ---- recipes and help texts ---------------------------------------------------------------------


GOOD_RECIPE = "name: t\nsources:\n  - {name: s, domain: plant, format: url_list, path: urls.csv}\n"


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("x: &a {n: 1}\ny: *a\n", "anchors and aliases"),
        ("mix:\n  - {name: m, plant: 1}\n  - {name: m, general: 1}\n", "mix names must be unique"),
        ("mix:\n  - {name: ../m, plant: 1}\n", "field 'mix.0.name'"),
    ],
)
def test_plantmix_recipe_hostile(tmp_path, monkeypatch, capsys, extra, needle):
    from plantmix.cli import main

    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE + extra)
    one_error_line(*run_main(main, ["plantmix", "build", str(recipe), "--dry-run"], monkeypatch, capsys), needle)


def _commands(app) -> list:
    import typer.main

    group = typer.main.get_group(app)
    out = []
    for name, cmd in group.commands.items():
        out += [(f"{name} {n}", c) for n, c in cmd.commands.items()] if hasattr(cmd, "commands") else [(name, cmd)]
    return out


def test_every_option_has_help_and_its_default(monkeypatch, capsys):
    from click.testing import CliRunner

    import dalip.cli
    import plantmix.cli

    for app in (plantmix.cli.app, dalip.cli.app):
        for name, cmd in _commands(app):
            for param in cmd.params:
                assert getattr(param, "help", "x"), f"{name} {param.opts}: no help"
    train = dict(_commands(dalip.cli.app))["train"]
    text = " ".join(CliRunner().invoke(train, ["--help"], terminal_width=1000).output.split())
    options = [p for p in train.params if p.name != "config" and p.name != "help"]
    assert len(options) == 34
    for p in options:
        assert "[default:" in p.help, p.opts
    assert "--lr <float> peak learning rate (AdamW) [default: 0.0005]." in text
    # every config key without a flag is listed after the options, nested sections unfolded
    from dalip.config import AugmentOptions, MBDCOptions, TrainConfig

    flagged = {p.name for p in train.params}
    keys = [k for k in TrainConfig.model_fields if k not in flagged]
    keys += [f"mbdc.{k}" for k in MBDCOptions.model_fields if k != "dropout"] + [f"augment.{k}" for k in AugmentOptions.model_fields]
    assert "mbdc.heads" in keys and "augment.scale" in keys
    for key in keys:
        assert f" {key}: " in text, key
    assert "augment.scale: area range of the random resized crop [default: (0.9, 1.0)]." in text
    mix = " ".join(CliRunner().invoke(dict(_commands(plantmix.cli.app))["mix"], ["--help"], terminal_width=1000).output.split())
    assert "Mix name [default: from ratio/total/seed]." in mix and "Samples per output shard. [default: 10000]" in mix


def test_two_runs_evaluated_into_one_folder_keep_both(world, monkeypatch, capsys):
    other = world / "runs" / "other"
    if not other.exists():  # the same step of another run: other weights
        shutil.copytree(world / "runs" / "m", other)
        weights = other / "checkpoints" / "step_00000001" / "model.safetensors"
        tensors = safetensors.torch.load_file(weights)
        tensors["base.logit_scale"] = tensors["base.logit_scale"] + 1
        safetensors.torch.save_file(tensors, weights)
    out = world / "shared_eval"
    for run in ("m", "other"):
        assert dalip(["eval", str(world / "runs" / run), "--imagefolder", str(world / "folder"), "--out", str(out)], monkeypatch, capsys)[0] == 0
    kept = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(kept) == 2 and kept[0] == "step_00000001" and kept[1].startswith("step_00000001-")
    fingerprints = {json.loads((out / k / "results.json").read_text())["model_fingerprint"] for k in kept}
    assert len(fingerprints) == 2
