"""The decision step (DESIGN §3): proposals in, `keep`, `drop_reason`, `dup_of` out — in one declared order.

1. Row-level rejections: ingest and download outcomes (already on the joined rows), then rows held
   out as evaluation data (`plantmix split`), then the filters' image and caption proposals. Rows
   that pass are the *survivors*.
2. Duplicate groups among survivors only, so a group is never lost while one member survives:
   exact groups (same sha256) elect their best member by the keep rule; those representatives are
   merged by pHash (equal values first, then the near pairs proposed by dedup) greedily in keep-rule
   order — a representative is kept unless a better kept one lies within the radius. Every other
   survivor gets `duplicate_exact` when its sha256 equals that of the row it is assigned to, else
   `duplicate_near`, and `dup_of` = the nearest kept twin (smallest distance, then keep rule).
3. Rows rejected in step 1 that are copies of a kept row get `dup_of` too (their reason stays), so
   their valid captions join the kept row's `captions`, own caption first.
A group whose members name different species is a label conflict: flagged on every member
(`label_conflict`), resolved only by the keep rule (source priority first), and reported.

With model-based proposals (`ModelProposals`, from the score stage) the order is, row level: ingest /
download, held_out, eval_overlap (like held_out: never a kept twin, never attached to one), image
filters, caption filters, clip_score_low, relevance (plant_in_general / not_a_plant; a `route: move`
proposal moves the row to the other domain instead, `routed_from` naming the old one, and the row
stays eligible). Then the duplicate groups: exact, near, then semantic pairs among the rows still
kept, greedy in keep-rule order (`duplicate_semantic`, dup_of = the kept twin of highest cosine); rows
that pointed at a row lost to a semantic twin are re-pointed at that twin, so dup_of always names a
kept row, and the kept row's `captions` gather its semantic group's valid captions too.

Invariants (checked by `check_invariants`, asserted in tests): `dup_of` names a kept row; a
duplicate_exact row has its dup_of's sha256 and a duplicate_near or duplicate_semantic row does not;
kept rows are pairwise farther apart than the radius, and no two kept rows form a semantic pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.overlap import ahead
from plantmix.core.recipe import DedupConfig
from plantmix.core.stage import atomic_path
from plantmix.core.schema import (
    DECISION_FIELDS, DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR, DROP_DUPLICATE_SEMANTIC, DROP_EVAL_OVERLAP, DROP_HELD_OUT,
    MANIFEST_EXTRA_FIELDS, MODEL_DECISION_FIELDS, pandas_readable,
)  # fmt: skip
from plantmix.core.hashing import popcount64
from plantmix.curate.dedup import KeepRule, greedy_keep, group_winners, sha_groups

NONE = -1


def decide(
    joined: pa.Table, filters: pa.Table, pairs: pa.Table, cfg: DedupConfig, source_priority: dict[str, int],
    held_out: pa.Table | None = None, model: ModelProposals | None = None,
) -> pa.Table:
    """The manifest: `joined` with the decision columns set (same rows, same order).

    `held_out` (uid, split) lists rows set aside as evaluation data (`plantmix split`): rejected first
    among the curation reasons, never a kept twin, never attached to one. `model`: the score stage's
    proposals, when the recipe has model-based curation (module doc).
    """
    present = [c for c in DECIDE_COLUMNS if c in joined.column_names]
    return pandas_readable(apply_decisions(joined, decision_columns(joined.select(present), filters, pairs, cfg, source_priority, held_out, model)))


def decide_to_parquet(
    joined_path: Path, filters: pa.Table, pairs: pa.Table, cfg: DedupConfig, source_priority: dict[str, int],
    held_out: pa.Table | None, out_path: Path, model: ModelProposals | None = None,
) -> None:
    """`decide`, reading only the columns the decision needs, then streaming the manifest out row group
    by row group, so memory holds those columns, not every column of every row."""
    source = pq.ParquetFile(joined_path)
    present = [c for c in DECIDE_COLUMNS if c in source.schema_arrow.names]
    # repeated strings stay dictionary-encoded: only compared, never combined with other string columns
    coded = [c for c in ("source", "taxon_species") if c in present]
    joined = pq.read_table(joined_path, columns=present, read_dictionary=coded)
    columns = decision_columns(joined, filters, pairs, cfg, source_priority, held_out, model)
    del joined
    schema = None
    starts = np.cumsum([0] + [source.metadata.row_group(i).num_rows for i in range(source.num_row_groups)])

    def load(i: int) -> pa.Table:
        # a reader per call: the next row group is read and decided while this one is written
        part = pq.ParquetFile(joined_path, metadata=source.metadata).read_row_group(i)
        return apply_decisions(part, {k: v.slice(starts[i], part.num_rows) for k, v in columns.items()})

    with atomic_path(out_path) as tmp:
        writer = None
        for _, part in ahead(load, range(source.num_row_groups)):
            if writer is None:
                schema = pandas_readable(part).schema
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            writer.write_table(part.cast(schema), row_group_size=256_000)
        if writer is None:  # no rows at all
            empty = pandas_readable(apply_decisions(source.schema_arrow.empty_table(), {k: v.slice(0, 0) for k, v in columns.items()}))
            pq.write_table(empty, tmp)
        else:
            writer.close()


# the columns the decision reads (everything else of a row just passes through)
DECIDE_COLUMNS = ["uid", "source", "keep", "drop_reason", "sha256", "phash", "width", "height", "original_width",
                  "original_height", "stored_bytes", "original_bytes", "caption", "taxon_species"]  # fmt: skip


def decision_columns(
    joined: pa.Table, filters: pa.Table, pairs: pa.Table, cfg: DedupConfig, source_priority: dict[str, int],
    held_out: pa.Table | None = None, model: ModelProposals | None = None,
) -> dict[str, pa.Array]:
    """keep, drop_reason, dup_of and the DECISION_FIELDS for every row of `joined` (see module doc);
    with `model`, also the model columns (`ModelRows.columns`, applied by `apply_model_decisions`)."""
    if filters.num_rows != joined.num_rows or not filters["uid"].equals(joined["uid"]):
        raise PlantmixError("decide: filter proposals do not match the joined manifest; rerun the filter stage")
    held = np.zeros(joined.num_rows, bool)
    if held_out is not None and held_out.num_rows:
        held = pc.is_in(joined["uid"], value_set=held_out["uid"].combine_chunks()).to_numpy(zero_copy_only=False)
    usable = joined["keep"].to_numpy(zero_copy_only=False) & ~held
    image_ok = pc.is_null(filters["image_reason"]).to_numpy(zero_copy_only=False)
    caption_ok = pc.is_null(filters["caption_reason"]).to_numpy(zero_copy_only=False)
    survivor = usable & image_ok & caption_ok
    rows = model_rows(joined, model, usable, survivor) if model is not None else None
    if rows is not None:
        usable, survivor = usable & ~rows.eval_bad, survivor & ~rows.eval_bad & rows.passes
        caption_ok = caption_ok & ~rows.clip_bad  # a caption that does not match its image joins no group
    rule = KeepRule(joined, source_priority, np.nonzero(usable)[0])
    target, distance = _assign(joined, survivor, usable, pairs, cfg, rule)
    if rows is not None:
        semantic_assign(joined, survivor, target, distance, model.semantic_pairs, rule, rows)
    out = _columns(joined, filters, survivor, caption_ok & usable, target, distance, held, rows)
    return out if rows is None else {**out, **rows.columns}


# ---- assignment ---------------------------------------------------------------------------------------


def _assign(joined: pa.Table, survivor: np.ndarray, usable: np.ndarray, pairs: pa.Table, cfg: DedupConfig, rule: KeepRule):
    """Per row: the row it is a copy of (NONE for kept and unrelated rows) and the pHash distance."""
    n = joined.num_rows
    target = np.full(n, NONE, np.int64)
    distance = np.zeros(n, np.int16)
    rows = np.nonzero(survivor)[0]
    rep = rows.copy()  # exact representative of each survivor
    if cfg.exact and len(rows):
        sha = joined["sha256"]
        has_sha = pc.is_valid(sha).to_numpy(zero_copy_only=False)[rows]
        sub = rows[has_sha]
        rep[has_sha] = sub[group_winners(sha_groups(sha, sub), sub, rule)]
    phash = pc.fill_null(joined["phash"], 0).to_numpy()
    kept_of = rep.copy()  # final kept row of each survivor
    if cfg.near and len(rows):
        reps = np.unique(rep)
        final, dist = _near_keep(reps, phash, pairs, cfg.phash_radius, rule)
        where = np.searchsorted(reps, rep)
        kept_of, d = final[where], dist[where]
        distance[rows] = d
    copy = kept_of != rows
    target[rows[copy]] = kept_of[copy]
    _attach_rejected(joined, survivor, usable, target, distance, phash, pairs, cfg, rule)
    return target, distance


def _near_keep(reps: np.ndarray, phash: np.ndarray, pairs: pa.Table, radius: int, rule: KeepRule):
    """Greedy near dedup over exact representatives: (kept row, distance) for each of `reps`."""
    order = rule.order(reps)
    ranked = reps[order]  # best first
    values, node = np.unique(phash[ranked], return_inverse=True)
    # node rank = rank of its best member; nodes are ranked in order of first appearance
    first = np.full(len(values), len(ranked), np.int64)
    np.minimum.at(first, node, np.arange(len(ranked)))
    node_rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    best_row = np.empty(len(values), np.int64)
    best_row[node_rank] = ranked[first]
    a, b, d = _pairs_between(values, pairs, radius)
    ra, rb = node_rank[a], node_rank[b]
    parent = greedy_keep(len(values), np.minimum(ra, rb), np.maximum(ra, rb))  # over ranks
    kept = parent == -1
    to = np.arange(len(values))  # rank of each node's kept node
    to_dist = np.zeros(len(values), np.int16)
    lost = np.nonzero(~kept)[0]
    if len(lost):
        # nearest kept neighbour (any rank), ties by rank
        x = np.r_[ra, rb]
        y = np.r_[rb, ra]
        dd = np.r_[d, d].astype(np.int16)
        ok = ~kept[x] & kept[y]
        x, y, dd = x[ok], y[ok], dd[ok]
        o = np.lexsort((y, dd, x))
        x, y, dd = x[o], y[o], dd[o]
        head = np.r_[True, x[1:] != x[:-1]]
        to[x[head]], to_dist[x[head]] = y[head], dd[head]
    rank_of = node_rank[node]  # per ranked rep
    kept_row = best_row[to[rank_of]]
    dist = to_dist[rank_of]
    out_row = np.empty(len(reps), np.int64)
    out_dist = np.empty(len(reps), np.int16)
    out_row[order], out_dist[order] = kept_row, dist
    return out_row, out_dist


def _pairs_between(values: np.ndarray, pairs: pa.Table, radius: int):
    """The proposed pairs whose both pHash values are in sorted `values`, within `radius`, as indices."""
    pa_, pb = pairs["phash_a"].to_numpy(), pairs["phash_b"].to_numpy()
    d = pairs["distance"].to_numpy()
    ia = np.clip(np.searchsorted(values, pa_), 0, max(len(values) - 1, 0))
    ib = np.clip(np.searchsorted(values, pb), 0, max(len(values) - 1, 0))
    if not len(values):
        return ia[:0], ib[:0], d[:0]
    ok = (values[ia] == pa_) & (values[ib] == pb) & (d <= radius)
    return ia[ok], ib[ok], d[ok]


def _attach_rejected(joined, survivor, usable, target, distance, phash, pairs, cfg: DedupConfig, rule: KeepRule) -> None:
    """Point rows rejected at row level that copy a kept row at it: the kept row with the same sha256,
    else the nearest by pHash (ties by the keep rule, as for survivors)."""
    kept = survivor & (target == NONE)
    rejected = np.nonzero(usable & ~survivor)[0]
    if not len(rejected) or not kept.any():
        return
    kept_rows = np.nonzero(kept)[0]
    if cfg.exact:
        sha = joined["sha256"]
        hit = pc.index_in(sha.take(pa.array(rejected)), value_set=sha.take(pa.array(kept_rows)).combine_chunks(), skip_nulls=True)
        found = pc.is_valid(hit).to_numpy(zero_copy_only=False)
        target[rejected[found]] = kept_rows[pc.drop_null(hit).to_numpy()]
    if not cfg.near:
        return
    left = rejected[target[rejected] == NONE]
    # kept rows by pHash value (kept rows are never within the radius of each other, so one per value)
    kv, kfirst = np.unique(phash[kept_rows], return_index=True)
    values = np.unique(np.r_[kv, phash[left]])
    a, b, d = _pairs_between(values, pairs, cfg.phash_radius)
    same = np.arange(len(values))
    x, y, dd = np.r_[a, b, same], np.r_[b, a, same], np.r_[d, d, np.zeros(len(values), d.dtype)]
    ok = np.isin(values, kv)[y]
    x, y, dd = x[ok], y[ok], dd[ok]
    candidate = kept_rows[kfirst[np.searchsorted(kv, values[y])]]
    uniq = np.unique(candidate)
    rank = np.empty(len(uniq), np.int64)
    rank[rule.order(uniq)] = np.arange(len(uniq))
    o = np.lexsort((rank[np.searchsorted(uniq, candidate)], dd, x))
    x, dd, candidate = x[o], dd[o], candidate[o]
    head = np.r_[True, x[1:] != x[:-1]] if len(x) else np.zeros(0, bool)
    nearest = np.full(len(values), NONE, np.int64)
    near_d = np.zeros(len(values), np.int16)
    nearest[x[head]] = candidate[head]
    near_d[x[head]] = dd[head]
    pos = np.searchsorted(values, phash[left])
    target[left] = nearest[pos]
    distance[left] = near_d[pos]


# ---- output -------------------------------------------------------------------------------------------


def _columns(joined, filters, survivor, caption_ok, target, distance, held, model=None) -> dict[str, pa.Array]:
    n = joined.num_rows
    uid = joined["uid"]
    has_target = target != NONE
    dup_uid = pc.replace_with_mask(pa.nulls(n, pa.string()), pa.array(has_target), uid.take(pa.array(target[has_target])).combine_chunks())
    keep = survivor & ~has_target
    sha = joined["sha256"]
    same_sha = np.zeros(n, bool)
    if has_target.any():
        same_sha[has_target] = pc.fill_null(pc.equal(sha.take(pa.array(np.nonzero(has_target)[0])), sha.take(pa.array(target[has_target]))), False).to_numpy(zero_copy_only=False)
    dup_reason = np.where(same_sha, DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR)
    held_reason = pa.array(np.where(held, DROP_HELD_OUT, None).tolist(), pa.string()) if held.any() else pa.nulls(n, pa.string())
    if model is None:
        row_reason = pc.coalesce(joined["drop_reason"], held_reason, filters["image_reason"], filters["caption_reason"])
    else:
        dup_reason = np.where(~same_sha & model.semantic, DROP_DUPLICATE_SEMANTIC, dup_reason)
        row_reason = model.row_reason(joined["drop_reason"], held_reason, filters)
    reason = pc.if_else(pa.array(survivor & has_target), pa.array(dup_reason), row_reason)
    reason = pc.if_else(pa.array(keep), pa.nulls(n, pa.string()), reason)
    dist = pa.array(np.where(has_target, distance, 0).astype(np.int8), mask=~has_target)
    captions, conflict = _group_columns(joined, keep, caption_ok, target, distance)
    captions = _with_collapsed_captions(captions, filters, keep, target)
    return {"keep": pa.array(keep), "drop_reason": _flat(reason), "dup_of": _flat(dup_uid), "captions": captions,
            "dup_distance": dist, "label_conflict": conflict}  # fmt: skip


def _flat(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def apply_decisions(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with the decision columns replaced (keep, drop_reason, dup_of) or added (DECISION_FIELDS)."""
    for name in ("keep", "drop_reason", "dup_of"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(name), columns[name])
    for f in DECISION_FIELDS:
        table = _put(table, f, columns[f.name])
    if "route_to" in columns:  # the score stage ran
        table = apply_model_decisions(table, columns)
    return table


def _put(table: pa.Table, field: pa.Field, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(field.name)
    return table.set_column(i, field, values) if i >= 0 else table.append_column(field, values)


def _group_columns(joined, keep, caption_ok, target, distance):
    """`captions` of kept rows (own first, then members' valid ones by distance, uid) and `label_conflict`.

    Vectorised over the grouped rows only; a kept row alone gets [its caption] by index arithmetic. The
    list column is built a span of rows at a time, so no step copies the whole caption column.
    """
    caption = joined["caption"]
    valid = caption_ok & _non_empty(caption)
    members = np.flatnonzero(target != NONE)
    heads = np.unique(target[members])
    extra, extra_len, conflict = _group_texts(joined, heads, members, target, distance, valid)
    return _caption_lists(caption, keep, valid, heads, extra, extra_len), pa.array(conflict)


_SPAN_ROWS = 1 << 20  # rows per chunk of the captions column


def _strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One plain string array (a dictionary-encoded column decoded)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values if values.type == pa.string() else values.cast(pa.string())


def _non_empty(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row: the string is neither null nor empty (dictionary columns measured on their dictionary)."""
    chunks = strings.chunks if isinstance(strings, pa.ChunkedArray) else [strings]
    parts = []
    for c in chunks:
        if pa.types.is_dictionary(c.type):
            ok = pc.fill_null(pc.greater(pc.utf8_length(c.dictionary.cast(pa.string())), 0), False)
            parts.append(pc.fill_null(ok.take(c.indices), False).to_numpy(zero_copy_only=False))
        else:
            parts.append(pc.fill_null(pc.greater(pc.utf8_length(c.cast(pa.string())), 0), False).to_numpy(zero_copy_only=False))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def _codes_of(strings: pa.Array) -> np.ndarray:
    """Equal codes for equal strings (nulls get -1)."""
    return pc.fill_null(pc.dictionary_encode(strings).indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _group_texts(joined, heads: np.ndarray, members: np.ndarray, target: np.ndarray, distance: np.ndarray, valid: np.ndarray):
    """Per group (one per head, in head order): its distinct valid captions in group order (head,
    then members by distance, uid), their count, and the label-conflict flag of every row."""
    conflict = np.zeros(joined.num_rows, bool)
    if not len(heads):
        return pa.array([], pa.string()), np.zeros(0, np.int64), conflict
    rows = np.r_[heads, members]
    group = np.searchsorted(heads, np.r_[heads, target[members]])
    keys = pa.table({
        "g": group, "m": np.r_[np.zeros(len(heads), np.int8), np.ones(len(members), np.int8)],
        "d": np.r_[np.zeros(len(heads), np.int16), distance[members]], "u": joined["uid"].take(pa.array(rows)), "r": rows,
    })  # fmt: skip
    order = pc.sort_indices(keys, sort_keys=[(k, "ascending") for k in keys.column_names]).to_numpy()
    rows, group = rows[order], group[order]
    wide = np.int64(len(rows) + 1)  # (group, code) packed in one int64
    # a caption counts once per group, at its first place in group order
    text = _strings(joined["caption"].take(pa.array(rows)))
    ok = np.flatnonzero(valid[rows])
    _, first = np.unique(group[ok] * wide + _codes_of(text)[ok], return_index=True)
    picked = ok[np.sort(first)]
    # more than one named species in a group: every member is flagged
    species = _strings(joined["taxon_species"].take(pa.array(rows)))
    named = _non_empty(species)
    pairs = np.unique(group[named] * wide + _codes_of(species)[named])
    conflict[rows[np.bincount(pairs // wide, minlength=len(heads))[group] > 1]] = True
    return text.take(pa.array(picked)), np.bincount(group[picked], minlength=len(heads)), conflict


def _caption_lists(caption: pa.ChunkedArray, keep, valid, heads, extra: pa.Array, extra_len: np.ndarray) -> pa.ListArray:
    """The captions column: null for dropped rows, the group's captions for heads, else [own caption]
    when it is valid. Built a span of rows at a time, each span taking from its own captions and the
    extra captions of the heads in it, then joined into one array."""
    n = len(keep)
    lengths = (keep & valid).astype(np.int64)
    lengths[heads] = extra_len
    offsets = np.r_[0, np.cumsum(lengths)]
    extra_at = np.r_[0, np.cumsum(extra_len)]  # group j's captions are extra[extra_at[j]:extra_at[j + 1]]
    alone = keep & valid
    alone[heads] = False
    chunks = []
    for a in range(0, n, _SPAN_ROWS):
        b = min(n, a + _SPAN_ROWS)
        ha, hb = np.searchsorted(heads, [a, b])
        local = offsets[a : b + 1] - offsets[a]
        index = np.empty(local[-1], np.int64)
        solo = np.flatnonzero(alone[a:b])
        index[local[solo]] = solo
        h, k = heads[ha:hb] - a, extra_len[ha:hb]
        e0 = extra_at[ha]
        within = np.arange(extra_at[hb] - e0) - np.repeat(extra_at[ha:hb] - e0, k)
        index[np.repeat(local[h], k) + within] = (b - a) + np.arange(extra_at[hb] - e0)
        pool = pa.concat_arrays([_strings(caption.slice(a, b - a)), extra.slice(e0, extra_at[hb] - e0)])
        chunks.append(pa.ListArray.from_arrays(pa.array(local.astype(np.int32)), pool.take(pa.array(index)), mask=pa.array(~keep[a:b])))
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.list_(pa.string()))


def _with_collapsed_captions(captions: pa.ListArray, filters: pa.Table, keep: np.ndarray, target: np.ndarray) -> pa.ListArray:
    """Kept rows' `captions`, then the valid captions of the input rows collapsed at ingest into the
    kept row or into its group's members (filter proposals), distinct: a repeated URL's other captions
    are not lost either. Python touches only the kept rows that receive some."""
    if "collapsed_captions" not in filters.column_names:
        return captions
    extra = filters["collapsed_captions"].combine_chunks()
    rows = np.nonzero(pc.fill_null(pc.list_value_length(extra), 0).to_numpy(zero_copy_only=False) > 0)[0]
    head = np.where(keep[rows], rows, target[rows])
    rows, head = rows[head != NONE], head[head != NONE]
    if not len(rows):
        return captions
    order = np.lexsort((rows, rows != head, head))  # per kept row: its own first, then its members'
    rows, head = rows[order], head[order]
    heads = np.unique(head)
    merged = dict(zip(heads.tolist(), captions.take(pa.array(heads)).to_pylist()))
    for h, texts in zip(head.tolist(), extra.take(pa.array(rows)).to_pylist()):
        merged[h].extend(texts)
    new = pa.array([list(dict.fromkeys(merged[h])) for h in heads.tolist()], captions.type)
    index = np.arange(len(captions))
    index[heads] = len(captions) + np.arange(len(heads))
    return pa.concat_arrays([captions, new]).take(pa.array(index))


# ---- invariants ---------------------------------------------------------------------------------------


def check_invariants(
    manifest: pa.Table, radius: int | None = None, mirror: bool = True, semantic_pairs: pa.Table | None = None
) -> list[str]:
    """Violations of the decision invariants (empty when all hold); `radius` also checks kept rows'
    pairwise pHash distance (mirror hashes included when `mirror`), which costs a pair search, and
    `semantic_pairs` (uid_a, uid_b) that no pair of it is kept on both sides."""
    import duckdb

    con = duckdb.connect()
    con.register("m", manifest.select(["uid", "keep", "drop_reason", "dup_of", "sha256"]))
    problems = []
    checks = {
        "dup_of names a row that is not kept": "SELECT count(*) FROM m a JOIN m b ON a.dup_of = b.uid WHERE NOT b.keep",
        "dup_of names no row": "SELECT count(*) FROM m a LEFT JOIN m b ON a.dup_of = b.uid WHERE a.dup_of IS NOT NULL AND b.uid IS NULL",
        "duplicate row without dup_of": f"SELECT count(*) FROM m WHERE drop_reason IN ('{DROP_DUPLICATE_EXACT}', '{DROP_DUPLICATE_NEAR}', '{DROP_DUPLICATE_SEMANTIC}') AND dup_of IS NULL",
        "duplicate_exact with another sha256": f"SELECT count(*) FROM m a JOIN m b ON a.dup_of = b.uid WHERE a.drop_reason = '{DROP_DUPLICATE_EXACT}' AND a.sha256 IS DISTINCT FROM b.sha256",
        "duplicate_near with the same sha256": f"SELECT count(*) FROM m a JOIN m b ON a.dup_of = b.uid WHERE a.drop_reason = '{DROP_DUPLICATE_NEAR}' AND a.sha256 = b.sha256",
        "duplicate_semantic with the same sha256": f"SELECT count(*) FROM m a JOIN m b ON a.dup_of = b.uid WHERE a.drop_reason = '{DROP_DUPLICATE_SEMANTIC}' AND a.sha256 = b.sha256",
        "kept row with a drop reason": "SELECT count(*) FROM m WHERE keep AND (drop_reason IS NOT NULL OR dup_of IS NOT NULL)",
    }
    if semantic_pairs is not None:
        con.register("s", semantic_pairs.select(["uid_a", "uid_b"]))
        checks["kept rows forming a semantic pair"] = "SELECT count(*) FROM s JOIN m a ON s.uid_a = a.uid JOIN m b ON s.uid_b = b.uid WHERE a.keep AND b.keep"
    for what, sql in checks.items():
        count = con.execute(sql).fetchone()[0]
        if count:
            problems.append(f"{what}: {count} row(s)")
    if radius is not None:
        from plantmix.curate.dedup import near_pair_proposals

        kept = manifest.filter(pc.and_(manifest["keep"], pc.is_valid(manifest["phash"])))
        mirrors = kept["phash_mirror"].to_numpy() if mirror else None
        close = near_pair_proposals(kept["phash"].to_numpy(), mirrors, radius)
        if close.num_rows:
            problems.append(f"kept rows within radius {radius} of each other: {close.num_rows} pair(s)")
    return problems


# ---- model-based proposals (the score stage: plantmix.curate.model_steps) ------------------------------


SCORE_FIELDS = [f for f in MANIFEST_EXTRA_FIELDS if f.name in ("clip_score", "plant_score")]


# the columns of the score stage's model_scores.parquet that the decision reads (eval_match / eval_file are for reports)
MODEL_DECIDE_COLUMNS = ["uid", "clip_score", "plant_score", "clip_reason", "relevance_reason", "route_to", "eval_overlap",
                        "semantic_cluster"]  # fmt: skip


@dataclass
class ModelProposals:
    """The score stage's proposals: `scores` row-aligned with the joined manifest (MODEL_SCORE_SCHEMA of
    plantmix.curate.model_steps), `semantic_pairs` (uid_a, uid_b, cosine) from SemDeDup."""

    scores: pa.Table
    semantic_pairs: pa.Table


@dataclass
class ModelRows:
    """What the model proposals decide at row level, per joined row (see the module doc)."""

    eval_bad: np.ndarray  # usable rows overlapping an evaluation set
    clip_bad: np.ndarray  # usable rows below their domain's CLIP-score threshold
    passes: np.ndarray  # no model rejection (a row moved by relevance routing passes)
    eval_reason: pa.Array
    clip_reason: pa.Array
    relevance_reason: pa.Array  # null where the row is moved instead
    columns: dict[str, pa.Array]  # clip_score, plant_score, semantic_cluster, eval_overlap, route_to
    semantic: np.ndarray | None = None  # rows assigned (or re-pointed) by the semantic step

    def row_reason(self, drop_reason, held_reason, filters: pa.Table):
        """The first row-level reason of each row, in the declared order."""
        return pc.coalesce(drop_reason, held_reason, self.eval_reason, filters["image_reason"], filters["caption_reason"],
                           self.clip_reason, self.relevance_reason)  # fmt: skip


def model_rows(joined: pa.Table, model: ModelProposals, usable: np.ndarray, survivor: np.ndarray) -> ModelRows:
    """Row-level model decisions: eval overlap, CLIP score, relevance (drop or move)."""
    s = model.scores
    if s.num_rows != joined.num_rows or not s["uid"].equals(joined["uid"]):
        raise PlantmixError("decide: model proposals do not match the joined manifest; rerun the score stage")

    def valid(name: str) -> np.ndarray:
        return pc.is_valid(s[name]).to_numpy(zero_copy_only=False)

    n = joined.num_rows
    eval_bad = usable & valid("eval_overlap")
    clip_bad = usable & valid("clip_reason")
    moving = valid("route_to")
    relevance_bad = usable & valid("relevance_reason") & ~moving
    # a row is moved only when it reaches the relevance step: earlier reasons win
    moved = survivor & ~eval_bad & ~clip_bad & moving
    nulls = pa.nulls(n, pa.string())
    eval_reason = pc.if_else(pa.array(eval_bad), pa.scalar(DROP_EVAL_OVERLAP), nulls)
    relevance_reason = pc.if_else(pa.array(moving), nulls, _flat(s["relevance_reason"]))
    columns = {
        "clip_score": _flat(s["clip_score"]), "plant_score": _flat(s["plant_score"]),
        "semantic_cluster": _flat(s["semantic_cluster"]), "eval_overlap": _flat(s["eval_overlap"]),
        "route_to": pc.if_else(pa.array(moved), _flat(s["route_to"]), nulls),
    }  # fmt: skip
    return ModelRows(eval_bad, clip_bad, ~clip_bad & ~relevance_bad, eval_reason, _flat(s["clip_reason"]),
                     relevance_reason, columns)  # fmt: skip


def semantic_assign(
    joined: pa.Table, survivor: np.ndarray, target: np.ndarray, distance: np.ndarray, pairs: pa.Table, rule: KeepRule,
    rows: ModelRows,
) -> None:
    """Semantic duplicates among the rows exact and near dedup kept: greedy in keep-rule order over the
    proposed pairs; a lost row points at its kept twin of highest cosine (ties by the keep rule), and
    every row that pointed at a lost row is re-pointed at that twin. Updates `target` and `distance`
    (plain pHash Hamming distance to the new dup_of) in place and sets `rows.semantic`."""
    n = joined.num_rows
    rows.semantic = np.zeros(n, bool)
    kept = survivor & (target == NONE)
    if not pairs.num_rows or not kept.any():
        return
    uid = joined["uid"].combine_chunks()
    ia, ib = (pc.index_in(pairs[c], value_set=uid) for c in ("uid_a", "uid_b"))
    found = pc.and_(pc.is_valid(ia), pc.is_valid(ib)).to_numpy(zero_copy_only=False)
    a = pc.fill_null(ia, 0).to_numpy()[found].astype(np.int64)
    b = pc.fill_null(ib, 0).to_numpy()[found].astype(np.int64)
    cosine = pairs["cosine"].to_numpy()[found]
    ok = kept[a] & kept[b] & (a != b)
    a, b, cosine = a[ok], b[ok], cosine[ok]
    if not len(a):
        return
    nodes = np.unique(np.r_[a, b])
    order = rule.order(nodes)
    rank = np.empty(len(nodes), np.int64)
    rank[order] = np.arange(len(nodes))
    row_of_rank = nodes[order]
    ra, rb = rank[np.searchsorted(nodes, a)], rank[np.searchsorted(nodes, b)]
    node_kept = greedy_keep(len(nodes), np.minimum(ra, rb), np.maximum(ra, rb)) == -1
    x, y, c = np.r_[ra, rb], np.r_[rb, ra], np.r_[cosine, cosine]
    sel = ~node_kept[x] & node_kept[y]
    x, y, c = x[sel], y[sel], c[sel]
    o = np.lexsort((y, -c, x))  # per lost node: highest cosine first, then best rank
    x, y = x[o], y[o]
    head = np.r_[True, x[1:] != x[:-1]]
    lost, twin = row_of_rank[x[head]], row_of_rank[y[head]]
    twin_of = np.full(n, NONE, np.int64)
    twin_of[lost] = twin
    target[lost] = twin
    pointing = np.nonzero(target != NONE)[0]
    pointing = pointing[twin_of[target[pointing]] != NONE]
    target[pointing] = twin_of[target[pointing]]
    rows.semantic[lost] = True
    rows.semantic[pointing] = True
    moved = np.nonzero(rows.semantic)[0]
    phash = pc.fill_null(joined["phash"].take(pa.array(np.r_[moved, target[moved]])), 0).to_numpy()
    distance[moved] = popcount64(phash[: len(moved)] ^ phash[len(moved):])


def apply_model_decisions(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """The model columns of a decided table: clip_score and plant_score filled, `domain` of moved rows
    replaced (their old domain in `routed_from`), and MODEL_DECISION_FIELDS added."""
    for f in SCORE_FIELDS:
        table = _put(table, f, columns[f.name].cast(f.type))
    route_to = columns["route_to"]
    i = table.schema.get_field_index("domain")
    domain = table.column(i)
    routed_from = pc.if_else(pc.is_valid(route_to), domain, pa.nulls(len(route_to), pa.string()))
    table = table.set_column(i, table.schema.field(i), pc.coalesce(route_to, domain))
    values = {"semantic_cluster": columns["semantic_cluster"], "eval_overlap": columns["eval_overlap"], "routed_from": routed_from}
    for f in MODEL_DECISION_FIELDS:
        table = _put(table, f, _flat(values[f.name]).cast(f.type))
    return table
