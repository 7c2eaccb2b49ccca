"""Score a demo build's curation decisions against the demo world's ground truth.

    .venv/bin/python benchmarks/score_curation.py builds/demo

Prints, per planted duplicate kind, the recall (the copy ends in its original's group); the precision
of every declared link (row → dup_of is a planted pair of the same image); the bad-caption groups
(kept row and its captions); the label conflicts; and the decision invariants.
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

from plantmix.curate.decide import check_invariants  # noqa: E402
from plantmix.stages.ingest import make_uid  # noqa: E402

COPY_KINDS = ("exact_dup", "near_dup_reencode", "near_dup_resize", "near_dup_crop", "near_dup_mirror",
              "group_garbage_caption", "group_good_copy", "conflict_other_species")  # fmt: skip


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


if __name__ == "__main__":
    main()
