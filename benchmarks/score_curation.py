"""Score a demo build's curation decisions against the demo world's ground truth.

    .venv/bin/python benchmarks/score_curation.py builds/demo

Prints, per planted duplicate kind, the recall (the copy ends in its original's group); the precision
of every declared link (row → dup_of is a planted pair of the same image); the bad-caption groups
(kept row and its captions); the label conflicts; and the decision invariants.

Then the model-based curation, per drop reason: the recall of its planted cases (dropped for that
reason; and dropped for that or another reason that is also right for the row, e.g. a scene in the plant
list dropped as clip_score_low rather than not_a_plant) and its precision (rows dropped for it that the
truth says deserve it). "Plants in the general list" counts every plant image there, the planted ones
and the general list's exact copies of plant-list rows (row-level reasons are decided before duplicates).
A reason whose recipe section the build did not have is "not checked". The last two columns judge
the check itself: its proposals (proposals/model_scores.parquet) before the decision step keeps one
reason per row, in the declared order (a row both checks flag ends with the earlier reason).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from plantmix.curate.decide import check_invariants  # noqa: E402
from plantmix.core.schema import (  # noqa: E402
    DROP_CLIP_SCORE_LOW, DROP_DUPLICATE_SEMANTIC, DROP_EVAL_OVERLAP, DROP_NOT_A_PLANT, DROP_PLANT_IN_GENERAL,
)
from plantmix.demo.world import CAPTION_FAULTS, MISMATCH_CROSS_DOMAIN, MISMATCH_SPECIES  # noqa: E402
from plantmix.stages.ingest import make_uid  # noqa: E402

COPY_KINDS = ("exact_dup", "near_dup_reencode", "near_dup_resize", "near_dup_crop", "near_dup_mirror",
              "group_garbage_caption", "group_good_copy", "conflict_other_species")  # fmt: skip
# drop reason -> the recipe section that proposes it
REASON_SECTION = {DROP_EVAL_OVERLAP: "decontaminate", DROP_PLANT_IN_GENERAL: "relevance", DROP_NOT_A_PLANT: "relevance",
                  DROP_CLIP_SCORE_LOW: "clip_score", DROP_DUPLICATE_SEMANTIC: "semantic_dedup"}


def _plant_image(g: dict) -> bool:
    return g["species"] is not None  # the truth names a species exactly when the image shows a plant


# A row's truth -> is dropping it for this reason right?
RIGHT = {
    DROP_EVAL_OVERLAP: lambda g: g.get("eval_image") is not None,
    DROP_PLANT_IN_GENERAL: lambda g: g["list"] == "general" and _plant_image(g),
    DROP_NOT_A_PLANT: lambda g: g["list"] == "plant" and not _plant_image(g),
    DROP_CLIP_SCORE_LOW: lambda g: g.get("caption_mismatch") is not None,
}
# A proposal is judged before the caption rules take their rows: a CLIP-score flag on a planted bad
# caption (empty, garbage, foreign script) is right too.
BAD_CAPTION_FAULTS = (*CAPTION_FAULTS, "group_empty_caption", "group_garbage_caption")
PROPOSAL_RIGHT = {**RIGHT, DROP_CLIP_SCORE_LOW: lambda g: RIGHT[DROP_CLIP_SCORE_LOW](g) or g.get("fault") in BAD_CAPTION_FAULTS}
# (label, reason, which planted rows its recall counts)
TARGETS = (
    ("eval copies", DROP_EVAL_OVERLAP, RIGHT[DROP_EVAL_OVERLAP]),
    ("plants in the general list", DROP_PLANT_IN_GENERAL, RIGHT[DROP_PLANT_IN_GENERAL]),
    ("scenes in the plant list", DROP_NOT_A_PLANT, RIGHT[DROP_NOT_A_PLANT]),
    ("captions naming the other domain", DROP_CLIP_SCORE_LOW,
     lambda g: g.get("caption_mismatch") == MISMATCH_CROSS_DOMAIN and _plant_image(g) == (g["list"] == "plant")),
    ("between-species caption swaps", DROP_CLIP_SCORE_LOW, lambda g: g.get("caption_mismatch") == MISMATCH_SPECIES),
)


def checked_reasons(build: Path, manifest_columns: list[str]) -> set[str]:
    """Reasons the build could produce: their recipe section is in its lock (else: a score column exists)."""
    lock = build / "recipe.lock.yaml"
    if lock.is_file():
        recipe = (yaml.safe_load(lock.read_text()) or {}).get("recipe", {})
        checks = (recipe.get("relevance") or {}).get("check", ["plant", "general"])  # the domains relevance checks
        unchecked = {reason for reason, domain in ((DROP_NOT_A_PLANT, "plant"), (DROP_PLANT_IN_GENERAL, "general"))
                     if domain not in checks}
        return {r for r, section in REASON_SECTION.items() if recipe.get(section)} - unchecked
    columns = {DROP_CLIP_SCORE_LOW: "clip_score", DROP_PLANT_IN_GENERAL: "plant_score", DROP_NOT_A_PLANT: "plant_score",
               DROP_EVAL_OVERLAP: "eval_overlap", DROP_DUPLICATE_SEMANTIC: "semantic_cluster"}
    return {r for r, c in columns.items() if c in manifest_columns}


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} = {a / b:.1%}" if b else "0/0"


def proposed_reasons(build: Path) -> dict[str, set[str]]:
    """uid -> the row-level model reasons the score stage proposed for it (before the decision step's
    declared order picks the first reason of each row)."""
    path = build / "proposals" / "model_scores.parquet"
    if not path.is_file():
        return {}
    out: dict[str, set[str]] = {}
    for r in pq.read_table(path).to_pylist():
        out[r["uid"]] = {x for x in (r.get("clip_reason"), r.get("relevance_reason")) if x}
        if r.get("eval_overlap"):
            out[r["uid"]].add(DROP_EVAL_OVERLAP)
        if r.get("route_to"):  # relevance routing moves the row instead of dropping it
            out[r["uid"]].add(DROP_PLANT_IN_GENERAL)
    return out


def score_model_curation(m: dict[str, dict], truth_of: dict[str, dict], checked: set[str],
                         group_of: dict[str, str], semantic: list[tuple[str, str]],
                         proposed: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """(case, recall, recall by any right reason, precision of the reason, recall and precision of the
    check's proposals) per planted model-curation kind."""
    out = []
    for label, reason, is_target in TARGETS:
        if reason not in checked:
            out.append((f"{label} ({reason})", "not checked", "", "", "", ""))
            continue
        targets = [u for u, g in truth_of.items() if is_target(g) and m[u]["status"] == "success"]
        hit = sum(m[u]["drop_reason"] == reason for u in targets)
        right_any = sum(RIGHT.get(m[u]["drop_reason"], lambda g: False)(truth_of[u]) for u in targets)
        dropped = [u for u, r in m.items() if r["drop_reason"] == reason]
        right = sum(RIGHT[reason](truth_of[u]) for u in dropped)
        flagged = [u for u, r in proposed.items() if reason in r]
        out.append((f"{label} ({reason})", _pct(hit, len(targets)), _pct(right_any, len(targets)), _pct(right, len(dropped)),
                    _pct(sum(reason in proposed.get(u, ()) for u in targets), len(targets)),
                    _pct(sum(PROPOSAL_RIGHT[reason](truth_of[u]) for u in flagged), len(flagged))))
    if DROP_DUPLICATE_SEMANTIC not in checked:
        out.append((f"semantic duplicates ({DROP_DUPLICATE_SEMANTIC})", "not checked", "", "", "", ""))
        return out
    head = lambda u: m[u]["dup_of"] or u  # noqa: E731
    found = sum(head(c) == head(o) for c, o in semantic)
    dropped = [u for u, r in m.items() if r["drop_reason"] == DROP_DUPLICATE_SEMANTIC]
    right = sum(group_of.get(u) is not None and group_of.get(u) == group_of.get(m[u]["dup_of"]) for u in dropped)
    out.append((f"semantic duplicates ({DROP_DUPLICATE_SEMANTIC})", _pct(found, len(semantic)), "", _pct(right, len(dropped)), "", ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--radius", type=int, default=8)
    args = ap.parse_args()
    manifest = pq.read_table(args.build / "manifest.parquet")
    m = {r["uid"]: r for r in manifest.to_pylist()}
    truth = pq.read_table(args.build / "demo_world" / "ground_truth.parquet").to_pylist()
    source = {"plant": "demo_plant", "general": "demo_general"}
    uid_of = {g["url"]: make_uid(source[g["list"]], key=g["key"]) for g in truth}
    planted = [(make_uid(source[g["list"]], key=g["key"]), uid_of[g["dup_of_url"]], g["fault"]) for g in truth
               if g["dup_of_url"] and g["fault"] in COPY_KINDS]  # fmt: skip
    semantic = [(make_uid(source[g["list"]], key=g["key"]), uid_of[g["dup_of_url"]]) for g in truth
                if g["fault"] == "semantic_dup"]  # fmt: skip

    def head(u: str) -> str:
        return m[u]["dup_of"] or u

    found, total = Counter(), Counter()
    for copy, original, kind in planted:
        total[kind] += 1
        found[kind] += head(copy) == head(original)
    print(f"{'planted copy kind':<26} recall")
    for kind in COPY_KINDS:
        if total[kind]:
            print(f"{kind:<26} {found[kind]}/{total[kind]} = {found[kind] / total[kind]:.1%}")
    group = {}
    for copy, original, _ in planted:
        group.setdefault(original, {original}).add(copy)
    group_of = {u: o for o, members in group.items() for u in members}
    links = [(u, r["dup_of"]) for u, r in m.items() if r["dup_of"]]
    right = sum(group_of.get(a) is not None and group_of.get(a) == group_of.get(b) for a, b in links)
    print(f"precision of declared links: {right}/{len(links)} = {right / max(1, len(links)):.1%}")
    for original in [uid_of[g["url"]] for g in truth if g["fault"] == "group_empty_caption"]:
        kept = [u for u in group[original] if m[u]["keep"]]
        kinds = {u: k for u, _, k in ((c, o, k) for c, o, k in planted)}
        print(f"bad-caption group {original}: kept {[kinds.get(u, 'original') for u in kept]}, "
              f"captions {m[kept[0]]['captions'] if kept else None}")
    conflicts = [(c, o) for c, o, k in planted if k == "conflict_other_species"]
    flagged = sum(m[c]["label_conflict"] and m[o]["label_conflict"] for c, o in conflicts)
    print(f"label conflicts flagged: {flagged}/{len(conflicts)}; rows flagged: {sum(r['label_conflict'] for r in m.values())}")
    problems = check_invariants(manifest, radius=args.radius)
    print("invariants:", "all hold" if not problems else problems)
    same_image = dict(group_of)
    for copy, original in semantic:  # every planted copy of one image, re-photographed ones included
        same_image[copy] = same_image.setdefault(original, original)
    truth_of = {uid_of[g["url"]]: g for g in truth}
    rows = score_model_curation(m, truth_of, checked_reasons(args.build, manifest.column_names), same_image, semantic,
                                proposed_reasons(args.build))
    print(f"\n{'model curation case':<52} {'recall':<16} {'any right reason':<18} {'precision':<16} "
          f"{'proposed':<16} proposals' precision")
    for label, recall, anyway, precision, flagged, flagged_precision in rows:
        print(f"{label:<52} {recall:<16} {anyway:<18} {precision:<16} {flagged:<16} {flagged_precision}")


if __name__ == "__main__":
    main()
