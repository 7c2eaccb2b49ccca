"""Hostile inputs to `plantmix build` (ingest), `mix`, `split`, `dedup-report` and `stats`: each is
refused with exit status 2 and exactly one `error:` line naming the problem, never a traceback, and
nothing half-written; hostile inputs that are valid data are ingested with every row accounted for.

The CLI's `main` runs in-process (an unexpected exception fails the test with its traceback); one case
also runs as a real subprocess, as users run it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from plantmix.cli import main
from plantmix.stages.ingest import over_max_rows

URL_LIST = {"name": "t", "sources": [{"name": "s", "domain": "plant", "format": "url_list", "path": "u.csv"}]}


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`plantmix ARGS` in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["plantmix", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def refused(monkeypatch, capsys, needle: str, *args: str) -> str:
    code, err = run_cli(monkeypatch, capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0], err
    return errors[0]


def write_recipe(tmp_path: Path, **source) -> Path:
    r = json.loads(json.dumps(URL_LIST))
    r["sources"][0].update(source)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def build_refused(monkeypatch, capsys, tmp_path: Path, needle: str, **source) -> None:
    """`plantmix build` of a one-source recipe is refused, and no candidates were written."""
    out = tmp_path / "b"
    refused(monkeypatch, capsys, needle, "build", write_recipe(tmp_path, **source), "--out", out, "--until", "ingest")
    assert not (out / "candidates.parquet").exists()


def _parquet(tmp_path: Path, name: str, table: pa.Table) -> str:
    pq.write_table(table, tmp_path / name)
    return name


# ---- url lists ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"url,caption\nhttp://x.example/1.jpg,caf\xe9 au lait\n", "the file must be UTF-8"),  # latin-1 caption
        (b"u\xffrl,caption\nhttp://x.example/1.jpg,a leaf\n", "the file must be UTF-8"),  # bad header
        (b"", "Empty CSV file"),
        (b"url,caption\nhttp://x.example/1.jpg,a,b,c\n", "Expected 2 columns, got 4"),
        (b"url,url,caption\nhttp://x.example/1.jpg,http://x.example/2.jpg,a leaf\n", "more than one column named 'url'"),
    ],
    ids=["non-utf8-value", "non-utf8-header", "empty", "ragged", "repeated-column"],
)
def test_bad_csv(monkeypatch, capsys, tmp_path, content, needle):
    (tmp_path / "u.csv").write_bytes(content)
    build_refused(monkeypatch, capsys, tmp_path, needle)


def test_non_utf8_json_and_parquet_strings(monkeypatch, capsys, tmp_path):
    """Arrow's json and parquet readers pass invalid UTF-8 through: ingest checks it and names the row."""
    (tmp_path / "u.jsonl").write_bytes(b'{"url": "http://x.example/1.jpg"}\n{"url": "http://x.example/\xff.jpg"}\n')
    build_refused(monkeypatch, capsys, tmp_path, "column 'url' of", path="u.jsonl")
    bad = pa.array([b"http://x.example/1.jpg", b"http://x.example/\xff.jpg"]).view(pa.string())
    name = _parquet(tmp_path, "u.parquet", pa.table({"url": bad}))
    build_refused(monkeypatch, capsys, tmp_path, "holds bytes that are not UTF-8 (row 1)", path=name)


@pytest.mark.parametrize(
    "column, values, needle",
    [
        ("url", pa.array([["http://x.example/1.jpg"]]), "column 'url' of"),
        ("caption", pa.array([{"text": "a leaf"}]), "holds struct<text: string> values"),
        ("url", pa.array([[("a", "b")]], pa.map_(pa.string(), pa.string())), "holds map<string, string"),
    ],
    ids=["list-url", "struct-caption", "map-url"],
)
def test_nested_parquet_columns(monkeypatch, capsys, tmp_path, column, values, needle):
    table = {"url": pa.array(["http://x.example/1.jpg"]), "caption": pa.array(["a leaf"]), column: values}
    build_refused(monkeypatch, capsys, tmp_path, needle, path=_parquet(tmp_path, "u.parquet", pa.table(table)))


def test_nested_taxon_column(monkeypatch, capsys, tmp_path):
    name = _parquet(tmp_path, "u.parquet", pa.table({"url": ["http://x.example/1.jpg"], "sp": pa.array([["Quercus"]])}))
    build_refused(monkeypatch, capsys, tmp_path, "column 'sp' of", path=name, columns={"taxon_species": "sp"})


def test_json_lines_that_are_not_objects(monkeypatch, capsys, tmp_path):
    (tmp_path / "u.jsonl").write_text("[1, 2]\n")
    build_refused(monkeypatch, capsys, tmp_path, "cannot read", path="u.jsonl")


def test_mapped_column_missing(monkeypatch, capsys, tmp_path):
    (tmp_path / "u.csv").write_text("url,caption\nhttp://x.example/1.jpg,a leaf\n")
    build_refused(monkeypatch, capsys, tmp_path, "lacks mapped column(s) ['sp']", columns={"taxon_species": "sp"})


def test_a_directory_where_a_file_is_expected(monkeypatch, capsys, tmp_path):
    (tmp_path / "u.csv").mkdir()
    build_refused(monkeypatch, capsys, tmp_path, "u.csv is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_url_list(monkeypatch, capsys, tmp_path):
    (tmp_path / "u.csv").write_text("url\nhttp://x.example/1.jpg\n")
    (tmp_path / "u.csv").chmod(0)
    build_refused(monkeypatch, capsys, tmp_path, "no permission to read path")


# ---- local sources ---------------------------------------------------------------------------------------


def test_image_folder_that_is_a_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "imgs").write_text("not a folder")
    build_refused(monkeypatch, capsys, tmp_path, "imgs is not a directory", format="image_folder", path="imgs")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_bad_taxonomy_table(monkeypatch, capsys, tmp_path, kind):
    (tmp_path / "imgs" / "Quercus_robur").mkdir(parents=True)
    if kind == "directory":
        (tmp_path / "tax.csv").mkdir()
    needle = "taxonomy table not found" if kind == "missing" else "tax.csv is a directory"
    build_refused(monkeypatch, capsys, tmp_path, needle, format="image_folder", path="imgs", taxonomy="tax.csv")


def test_webdataset_shard_that_is_not_a_tar(monkeypatch, capsys, tmp_path):
    (tmp_path / "s.tar").write_bytes(b"not a tar at all")
    build_refused(monkeypatch, capsys, tmp_path, "not a tar file (plain, gz, bz2 or xz)", format="webdataset", path="s.tar")


# ---- recipes and arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.mkdir(), "cannot read recipe"),
        (lambda p: p.write_text(""), "a recipe must be a YAML mapping"),
        (lambda p: p.write_bytes(b"\xff\xfe name: t"), "cannot read recipe"),
    ],
    ids=["directory", "empty", "non-utf8"],
)
def test_bad_recipe_file(monkeypatch, capsys, tmp_path, make, needle):
    make(tmp_path / "r.yaml")
    refused(monkeypatch, capsys, needle, "build", tmp_path / "r.yaml", "--out", tmp_path / "b")
    refused(monkeypatch, capsys, needle, "build", tmp_path / "r.yaml", "--dry-run")


@pytest.mark.parametrize("out", ["afile", "afile/below"])
def test_out_that_is_or_lies_below_a_file(monkeypatch, capsys, tmp_path, out):
    (tmp_path / "u.csv").write_text("url\nhttp://x.example/1.jpg\n")
    (tmp_path / "afile").write_text("a file")
    refused(monkeypatch, capsys, "exists and is not a directory", "build", write_recipe(tmp_path), "--out", tmp_path / out)
    assert (tmp_path / "afile").read_text() == "a file"


@pytest.mark.parametrize("option, needle", [("--distributor", "--distributor must be one of multiprocessing, pyspark"),
                                            ("--until", "--until must be one of ingest")])  # fmt: skip
def test_unknown_option_values(monkeypatch, capsys, tmp_path, option, needle):
    (tmp_path / "u.csv").write_text("url\nhttp://x.example/1.jpg\n")
    refused(monkeypatch, capsys, needle, "build", write_recipe(tmp_path), "--out", tmp_path / "b", option, "banana")
    assert not (tmp_path / "b" / "candidates.parquet").exists()


# ---- commands on a build directory -------------------------------------------------------------------------


COMMANDS = {
    "mix": lambda b: ["mix", b, "--ratio", "0.5", "--total", "4"],
    "split": lambda b: ["split", b, "--fraction", "0.5", "--out", b.parent / "eval"],
    "dedup-report": lambda b: ["dedup-report", b],
    "stats": lambda b: ["stats", b],
}
VALID_LOCK = {"recipe": URL_LIST}


def _build_dir(tmp_path: Path, kind: str) -> Path:
    b = tmp_path / "b"
    if kind == "missing":
        return b
    if kind == "file":
        b.write_text("not a build")
        return b
    b.mkdir()
    if kind == "empty":
        return b
    (b / "recipe.lock.yaml").write_text(yaml.safe_dump(VALID_LOCK))
    if kind == "corrupt manifest":
        (b / "manifest.parquet").write_bytes(b"PAR1 truncated")
    elif kind == "manifest lacks columns":
        pq.write_table(pa.table({"uid": ["a"]}), b / "manifest.parquet")
    elif kind == "corrupt lock":
        pq.write_table(pa.table({"uid": ["a"]}), b / "manifest.parquet")
        (b / "recipe.lock.yaml").write_text("recipe: [unclosed")
    elif kind == "lock without recipe":
        pq.write_table(pa.table({"uid": ["a"]}), b / "manifest.parquet")
        (b / "recipe.lock.yaml").write_text("just text")
    elif kind == "invalid lock recipe":
        pq.write_table(pa.table({"uid": ["a"]}), b / "manifest.parquet")
        (b / "recipe.lock.yaml").write_text(yaml.safe_dump({"recipe": {"name": "t", "sources": []}}))
    return b


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "kind", ["missing", "file", "empty", "corrupt manifest", "manifest lacks columns", "corrupt lock",
             "lock without recipe", "invalid lock recipe"],
)  # fmt: skip
def test_commands_on_broken_build_dirs(monkeypatch, capsys, tmp_path, command, kind):
    b = _build_dir(tmp_path, kind)
    line = refused(monkeypatch, capsys, "", *COMMANDS[command](b))
    assert str(b) in line  # names the build (or the file in it) that is wrong
    assert not (tmp_path / "eval").exists()  # nothing written before the refusal
    assert not (b.is_dir() and (b / "mixes").exists())


@pytest.mark.parametrize("broken", ["stages/joined.parquet", "proposals/filters.parquet"])
def test_dedup_report_on_corrupt_stage_outputs(monkeypatch, capsys, tmp_path, broken):
    b = _build_dir(tmp_path, "manifest lacks columns")
    for name in ("stages/joined.parquet", "proposals/filters.parquet"):
        (b / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"uid": ["a"]}), b / name)
    (b / broken).write_bytes(b"garbage")
    refused(monkeypatch, capsys, f"{b / broken}: cannot read", "dedup-report", b)


def test_a_real_process_prints_one_line(tmp_path):
    (tmp_path / "u.csv").write_bytes(b"url,caption\nhttp://x.example/1.jpg,caf\xe9\n")
    p = subprocess.run([sys.executable, "-m", "plantmix.cli", "build", str(write_recipe(tmp_path)), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(errors) == 1 and "UTF-8" in errors[0], p.stderr


# ---- hostile but valid data: ingested, every row accounted for -------------------------------------------


def test_odd_but_valid_url_list_accounts_for_every_row(monkeypatch, capsys, tmp_path):
    """Numeric URLs, blank and repeated URLs, one file column mapped to two of ours, rows past
    max_rows: nothing refused, every input row in the candidates or counted past the cap."""
    urls = pa.array([1, None, 3, 3, 5, 6, 7])
    name = _parquet(tmp_path, "u.parquet", pa.table({"link": urls, "caption": [f"row {i} text" for i in range(7)]}))
    recipe = write_recipe(tmp_path, path=name, columns={"url": "link", "key": "link"}, max_rows=5)
    code, err = run_cli(monkeypatch, capsys, "build", recipe, "--out", tmp_path / "b", "--until", "ingest")
    assert code == 0, err
    candidates = pq.read_table(tmp_path / "b" / "candidates.parquet")
    capped = over_max_rows(tmp_path / "b" / "candidates.parquet")
    assert pc.sum(candidates["input_rows"]).as_py() + pc.sum(capped["rows"]).as_py() == len(urls)
    assert candidates["source_key"].to_pylist() == ["1", None, "3", "5"]  # `3` twice: one row, input_rows 2
    assert candidates["input_rows"].to_pylist() == [1, 1, 2, 1]
    assert candidates["drop_reason"].to_pylist() == ["unsupported_url_scheme", "missing_url"] + ["unsupported_url_scheme"] * 2
    assert candidates["collapsed_captions"][2].as_py() == ["row 3 text"]


def test_header_only_csv_is_an_empty_source(monkeypatch, capsys, tmp_path):
    (tmp_path / "u.csv").write_text("url,caption\n")
    code, err = run_cli(monkeypatch, capsys, "build", write_recipe(tmp_path), "--out", tmp_path / "b", "--until", "ingest")
    assert code == 0, err
    assert pq.read_metadata(tmp_path / "b" / "candidates.parquet").num_rows == 0


def test_webdataset_with_odd_members_accounts_for_every_sample(monkeypatch, capsys, tmp_path):
    """A sample without an image, one with a non-UTF-8 caption, one with a broken json: all ingested."""
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("a.txt", b"caption without an image"), ("b.jpg", b"\xff\xd8 not really a jpeg"),
                           ("b.txt", b"caf\xe9"), ("c.jpg", b"bytes"), ("c.json", b"{broken")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    recipe = write_recipe(tmp_path, format="webdataset", path="s.tar")
    code, err = run_cli(monkeypatch, capsys, "build", recipe, "--out", tmp_path / "b", "--until", "ingest")
    assert code == 0, err
    c = pq.read_table(tmp_path / "b" / "candidates.parquet")
    assert c.num_rows == 3 and pc.sum(c["input_rows"]).as_py() == 3
    assert c["drop_reason"].to_pylist() == ["missing_image", None, None]
    assert c["caption"].to_pylist()[:2] == ["caption without an image", "caf\ufffd"]
