import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from plantmix.core.errors import PlantmixError
from plantmix.stages.ingest import ingest, make_uid
from plantmix.core.recipe import Recipe
from plantmix.core.schema import CANDIDATE_SCHEMA, MANIFEST_EXTRA_FIELDS, TAXON_COLUMNS

ROWS = [
    {"URL": "http://a.example/1.jpg", "TEXT": "a leaf of oak", "sp": "Quercus robur"},
    {"URL": "https://a.example/2.jpg", "TEXT": "a leaf of maple", "sp": "Acer campestre"},
    {"URL": "ftp://a.example/3.jpg", "TEXT": "wrong scheme", "sp": None},
    {"URL": "file:///etc/passwd", "TEXT": "local file", "sp": None},
    {"URL": None, "TEXT": "no url", "sp": None},
    {"URL": "http://a.example/1.jpg", "TEXT": "a leaf of oak", "sp": "Quercus robur"},  # repeated
]


def recipe(**source) -> Recipe:
    base = {"name": "s", "domain": "plant", "format": "url_list", "path": "x"}
    return Recipe.model_validate({"name": "t", "sources": [{**base, **source}]})


def write_list(tmp_path: Path, fmt: str) -> Path:
    df = pd.DataFrame(ROWS)
    p = tmp_path / f"urls.{fmt}"
    if fmt == "csv":
        df.to_csv(p, index=False)
    elif fmt == "tsv":
        df.to_csv(p, index=False, sep="\t")
    elif fmt == "parquet":
        df.to_parquet(p)
    else:
        df.to_json(p, orient="records", lines=True)
    return p


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_url_list_formats_and_accounting(tmp_path, fmt):
    path = write_list(tmp_path, fmt)
    r = recipe(path=str(path), columns={"url": "URL", "caption": "TEXT", "taxon_species": "sp"}, caption="scientific")
    table, [report] = ingest(r, tmp_path, tmp_path / "x")
    assert report.rows_read == 6 and report.collapsed == 1 and table.num_rows == 5
    assert pc.sum(table["input_rows"]).as_py() == 6
    reasons = table["drop_reason"].to_pylist()
    assert reasons == [None, None, "unsupported_url_scheme", "unsupported_url_scheme", "missing_url"]
    assert table["caption"].to_pylist()[:2] == ["a photo of Quercus robur.", "a photo of Acer campestre."]
    # a template whose fields are missing falls back to the source's own caption
    assert table["caption"].to_pylist()[2] == "wrong scheme"
    assert table["uid"][0].as_py() == make_uid("s", url="http://a.example/1.jpg")
    assert len(set(table["uid"].to_pylist())) == 5


def test_uid_is_stable_and_source_scoped():
    assert make_uid("a", url="u") == make_uid("a", url="u") != make_uid("b", url="u")


def test_missing_url_column_is_a_clear_error(tmp_path):
    path = write_list(tmp_path, "csv")
    with pytest.raises(PlantmixError, match=r"no url column 'link'.*columns: URL, TEXT, sp"):
        ingest(recipe(path=str(path), columns={"url": "link"}), tmp_path, tmp_path)
    with pytest.raises(PlantmixError, match="no url column 'url'"):
        ingest(recipe(path=str(path)), tmp_path, tmp_path)


def test_unreadable_and_unknown_files(tmp_path):
    bad = tmp_path / "urls.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(PlantmixError, match="cannot read .*urls.parquet as parquet"):
        ingest(recipe(path=str(bad)), tmp_path, tmp_path)
    with pytest.raises(PlantmixError, match="file not found"):
        ingest(recipe(path=str(tmp_path / "none.csv")), tmp_path, tmp_path)
    odd = tmp_path / "urls.xyz"
    odd.write_text("url\n")
    with pytest.raises(PlantmixError, match="set `file_format`"):
        ingest(recipe(path=str(odd)), tmp_path, tmp_path)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(buf, "PNG")
    return buf.getvalue()


def test_image_folder_with_taxonomy_captions(tmp_path):
    for cls in ("Quercus_robur", "Acer_campestre"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "imgs" / cls / f"{i}.png").write_bytes(_png())
    (tmp_path / "tax.csv").write_text("folder,common_name,taxon_family\nQuercus_robur,English oak,Fagaceae\n")
    r = recipe(format="image_folder", path="imgs", taxonomy="tax.csv", caption="combined")
    table, [report] = ingest(r, tmp_path, tmp_path / "x")
    assert report.rows_read == 4 and table.num_rows == 4
    caps = table["caption"].to_pylist()
    assert caps[0] == "a photo of Acer campestre." and caps[2] == "a photo of English oak (Quercus robur), a plant of the family Fagaceae."
    assert all(p.endswith(".png") and Path(p).is_file() for p in table["path"].to_pylist())
    assert table["drop_reason"].null_count == 4


def test_image_text_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(_png())
    (tmp_path / "d" / "a.txt").write_text("a green square\n")
    (tmp_path / "d" / "b.png").write_bytes(_png())
    table, _ = ingest(recipe(format="image_text_folder", path="d"), tmp_path, tmp_path)
    assert table["caption"].to_pylist() == ["a green square", None]


def test_webdataset_member_names_are_sanitised(tmp_path):
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("../../evil.png", _png())
        add("../../evil.txt", b"escaping caption")
        add("/abs/path.png", _png())
        add("ok.jpg", _png())
        add("ok.json", json.dumps({"caption": "from json", "license": "CC0"}).encode())
        link = tarfile.TarInfo("link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    table, [report] = ingest(recipe(format="webdataset", path=str(tar_path)), tmp_path, tmp_path / "extracted")
    assert report.rows_read == 3
    extracted = tmp_path / "extracted" / "s"
    for p in table["path"].to_pylist():
        assert Path(p).parent == extracted.resolve()
    assert not (tmp_path.parent / "evil.png").exists()
    assert table["caption"].to_pylist() == ["escaping caption", None, "from json"]
    assert table["license"].to_pylist()[2] == "CC0"


def test_unknown_format_rejected_by_recipe():
    with pytest.raises(Exception, match="format"):
        recipe(format="zip")


# ---- equivalence with the per-row ingest it replaced ---------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baseline_c2d31ad  # noqa: E402  (the per-row ingest as first written)


def reference_ingest(source, table, allowed_schemes, seed) -> pa.Table:
    rows, _ = baseline_c2d31ad.ingest_source(source, table, allowed_schemes, seed)
    return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)


_VALUES = [None, "", " ", "\u3000", "Quercus", " Quercus robur ", "Fagaceae", "oak", "it's", "ß\u00e9", "\u200a x\t"]
_URLS = [None, "", "  ", "http://a/1.jpg", "HTTPS://a/2.jpg", " http://a/3", "\thttp://a/4", "ftp://a/5", "file:///x",
         "ht\ttp://a/6", "//a/7", "a/8.jpg", "mailto:x", "http:x", "1http://a", "h+t.t-p://a", "data:image/png,x"]


def fuzz_url_list(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    pick = lambda values: [values[i] for i in rng.integers(0, len(values), n)]  # noqa: E731
    urls = [u if u is None or rng.random() < 0.3 else f"{u}?{rng.integers(0, n // 2)}" for u in pick(_URLS)]
    cols = {"url": urls, "caption": pick(_VALUES), "source_key": [None if rng.random() < 0.7 else f"k{rng.integers(0, n // 3)}" for _ in range(n)],
            "license": pick(_VALUES), **{c: pick(_VALUES) for c in (*TAXON_COLUMNS, "common_name")}}
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


@pytest.mark.parametrize("mode", ["column", "sample", "scientific", "common", "taxonomic", "combined"])
def test_same_candidates_as_the_per_row_ingest(tmp_path, mode):
    rows = fuzz_url_list(3000, seed=len(mode))
    path = tmp_path / "fuzz.parquet"
    pq.write_table(rows.rename_columns(["URL" if c == "url" else "KEY" if c == "source_key" else c for c in rows.column_names]), path)
    columns = {"url": "URL", "key": "KEY", "caption": "caption", "license": "license"}
    r = Recipe.model_validate({"name": "t", "seed": 7, "resources": {"batch_rows": 1000}, "sources": [
        {"name": "s", "domain": "plant", "format": "url_list", "path": str(path), "columns": columns,
         "caption": mode, "license": "CC0"}]})
    table, [report] = ingest(r, tmp_path, tmp_path / "x")
    expected = reference_ingest(r.sources[0], rows, r.download.allowed_schemes, r.seed)
    assert report.collapsed > 0 and report.rows_read == 3000
    assert table["collapsed_captions"].null_count < table.num_rows  # collapsed rows with other captions were planted
    for name in expected.column_names:
        assert table[name].to_pylist() == expected[name].to_pylist(), name


# ---- identity and accounting -------------------------------------------------------------------------


def test_uid_namespaces_keep_keys_urls_and_row_numbers_apart(tmp_path):
    """A row's key equal to another row's URL, or to `row:<i>` of a row with neither, used to share
    one uid (and one download); each row now has its own."""
    path = tmp_path / "urls.csv"
    path.write_text("key,url,caption\n"
                    "http://x.example/1.jpg,http://x.example/a.jpg,keyed by a url-like key\n"
                    ",http://x.example/1.jpg,a plain url\n"
                    "row:3,http://x.example/b.jpg,keyed like a row number\n"
                    ",,no key and no url\n")  # fmt: skip
    table, [report] = ingest(recipe(path=str(path)), tmp_path, tmp_path / "x")
    assert report.rows_read == 4 and report.collapsed == 0 and table.num_rows == 4
    assert table["uid"].to_pylist() == [
        make_uid("s", key="http://x.example/1.jpg"), make_uid("s", url="http://x.example/1.jpg"),
        make_uid("s", key="row:3"), make_uid("s", row=3),
    ]  # fmt: skip
    assert len(set(table["uid"].to_pylist())) == 4
    assert make_uid("s", key="k", url="u") == make_uid("s", key="k") != make_uid("s", url="k")
    with pytest.raises(ValueError):
        make_uid("s")


def test_image_folder_uids_are_keyed_by_relative_path(tmp_path):
    (tmp_path / "imgs" / "Quercus_robur").mkdir(parents=True)
    (tmp_path / "imgs" / "Quercus_robur" / "0.png").write_bytes(_png())
    table, _ = ingest(recipe(format="image_folder", path="imgs"), tmp_path, tmp_path / "x")
    assert table["uid"].to_pylist() == [make_uid("s", key="Quercus_robur/0.png")]


REPEATED = [  # (url, caption): one URL six times with four distinct captions (one blank, one repeated)
    ("http://x.example/1.jpg", "a leaf of an oak tree"), ("http://x.example/2.jpg", "a maple leaf in spring"),
    ("http://x.example/1.jpg", "an oak leaf in autumn light"), ("http://x.example/1.jpg", "a leaf of an oak tree"),
    ("http://x.example/1.jpg", " "), ("http://x.example/1.jpg", "an oak leaf in autumn light"),
    ("http://x.example/1.jpg", "x"),
]


def _repeated_list(tmp_path: Path) -> Path:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [u for u, _ in REPEATED], "caption": [c for _, c in REPEATED]}), path)
    return path


def test_collapsed_rows_keep_their_captions(tmp_path):
    table, [report] = ingest(recipe(path=str(_repeated_list(tmp_path))), tmp_path, tmp_path / "x")
    assert report.rows_read == 7 and report.collapsed == 5 and table.num_rows == 2
    assert table["input_rows"].to_pylist() == [6, 1]
    assert table["caption"].to_pylist() == ["a leaf of an oak tree", "a maple leaf in spring"]
    # distinct, in input order, the row's own caption and blanks left out
    assert table["collapsed_captions"].to_pylist() == [["an oak leaf in autumn light", "x"], None]


def test_collapsed_captions_reach_the_kept_rows_captions(tmp_path):
    """Through the filters (which reject the one-letter caption) and the decision, with a duplicate
    group on top: the kept twin's captions hold its own, its collapsed ones and its twin's."""
    from plantmix.core.recipe import DedupConfig, FilterConfig
    from plantmix.curate.decide import decide
    from plantmix.curate.filters import filter_proposals
    from plantmix.curate.dedup import PAIR_SCHEMA

    table, _ = ingest(recipe(path=str(_repeated_list(tmp_path))), tmp_path, tmp_path / "x")
    n = table.num_rows
    joined = table.drop_columns(["drop_reason"])
    extra = {"sha256": pa.array(["same"] * n), "phash": pa.array([7] * n, pa.uint64()),
             "width": pa.array([300, 200], pa.int64()), "height": pa.array([300, 200], pa.int64()),
             "keep": pa.array([True] * n)}
    for f in [*MANIFEST_EXTRA_FIELDS, pa.field("drop_reason", pa.string())]:
        joined = joined.append_column(f, extra.get(f.name, pa.nulls(n, f.type)))
    filters = filter_proposals(joined, FilterConfig())
    assert filters["collapsed_captions"].to_pylist() == [["an oak leaf in autumn light"], None]
    manifest = decide(joined, filters, PAIR_SCHEMA.empty_table(), DedupConfig(), {"s": 1})
    assert manifest["keep"].to_pylist() == [True, False] and manifest["dup_of"][1].as_py() == manifest["uid"][0].as_py()
    assert manifest["captions"][0].as_py() == ["a leaf of an oak tree", "a maple leaf in spring", "an oak leaf in autumn light"]


def test_rows_past_max_rows_are_counted(tmp_path):
    from plantmix.report import funnel
    from plantmix.stages.ingest import ingest_to_parquet, over_max_rows

    path = write_list(tmp_path, "parquet")
    r = recipe(path=str(path), columns={"url": "URL", "caption": "TEXT"}, max_rows=4)
    r = r.model_copy(update={"resources": r.resources.model_copy(update={"batch_rows": 3})})
    out = tmp_path / "b" / "candidates.parquet"
    [report] = ingest_to_parquet(r, tmp_path, tmp_path / "x", None, out)
    assert (report.rows_read, report.over_max_rows) == (4, 2)
    assert over_max_rows(out).to_pylist() == [{"source": "s", "domain": "plant", "rows": 2}]
    # the funnel of these candidates (as if nothing were downloaded) accounts for all 6 input rows
    c = pq.read_table(out)
    m = c.append_column("status", pa.array(["not_attempted"] * c.num_rows)).append_column("keep", pa.array([False] * c.num_rows))
    f = funnel(m, over_max_rows(out)).to_pylist()
    assert sum(x["rows"] for x in f if x["stage"] == "in") == len(ROWS)
    assert sum(x["rows"] for x in f if x["stage"] not in ("in", "flag")) == len(ROWS)
    assert {"source": "s", "domain": "plant", "stage": "ingest", "reason": "over_max_rows", "rows": 2} in f


def test_held_out_rows_of_other_uids_are_refused(tmp_path):
    """A split made before a change of uids must not silently stop excluding its evaluation images."""
    from plantmix.curate.split import HELD_OUT_SCHEMA, check_held_out

    uids = pa.chunked_array([pa.array([make_uid("s", url="http://x.example/1.jpg")])])
    held = pa.table([uids, pa.array(["sp"]), pa.array(["held_out"])], schema=HELD_OUT_SCHEMA)
    check_held_out(held, uids, tmp_path)
    check_held_out(None, uids, tmp_path)
    old = held.set_column(0, "uid", pa.array([hashlib.sha256(b"s\x00http://x.example/1.jpg").hexdigest()[:32]]))
    with pytest.raises(PlantmixError, match=r"1 held-out row\(s\) are not rows of this build"):
        check_held_out(old, uids, tmp_path)
