"""Caption templates built from taxonomy (scientific, common, full taxonomic, combined), column-wise.

Inputs are Arrow arrays of the taxon_* and common_name values stripped of whitespace, null where
blank; a template is null when its fields are missing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plantmix.core.schema import CAPTION_TEMPLATES, TAXON_RANKS


def _join(*parts: pa.Array | str) -> pa.Array:
    """Concatenation, null when any part is null."""
    return pc.binary_join_element_wise(*parts, "")


def caption_variants(taxa: dict[str, pa.Array]) -> dict[str, pa.Array]:
    """All template captions of a batch: template name → array."""
    species, common, family = taxa["taxon_species"], taxa["common_name"], taxa["taxon_family"]
    # ", <rank> <value>" per known rank, concatenated, then the leading ", " cut (a join with
    # null_handling="skip" would be shorter, but drops all-null rows in this pyarrow)
    ranks = [pc.fill_null(_join(f", {r} ", taxa[f"taxon_{r}"]), "") for r in TAXON_RANKS[:-1]]
    lineage = _join(*ranks)
    lineage = pc.if_else(pc.equal(lineage, ""), pa.scalar(None, pa.string()), pc.utf8_slice_codeunits(lineage, 2))
    scientific = _join("a photo of ", species, ".")
    common_c = _join("a photo of ", common, ", a type of plant.")
    taxonomic = _join("a photo of ", species, ", ", lineage, ".")
    family_part = pc.coalesce(_join(", a plant of the family ", family, "."), pa.scalar("."))
    combined = pc.coalesce(_join("a photo of ", common, " (", species, ")", family_part), scientific, common_c)
    variants = {"scientific": scientific, "common": common_c, "taxonomic": taxonomic, "combined": combined}
    assert tuple(variants) == CAPTION_TEMPLATES
    return variants


def caption_variants_of(taxa: dict[str, str | None]) -> dict[str, str | None]:
    """`caption_variants` of one row given as plain values (taxon_* and common_name)."""
    columns = {k: pa.array([taxa.get(k)], pa.string()) for k in (*(f"taxon_{r}" for r in TAXON_RANKS), "common_name")}
    return {t: v[0].as_py() for t, v in caption_variants(columns).items()}


def pick_caption(
    mode: str, column_caption: pa.Array, variants: dict[str, pa.Array], pick_hash: np.ndarray | None
) -> pa.Array:
    """The training caption of each row under a source's caption mode.

    `column`: the source's own caption. A template name: that template, falling back to the column
    caption when the template's fields are missing. `sample`: one of the row's available templates,
    the (h mod their number)-th in template order, where h = `pick_hash` (the first 8 bytes, big-endian,
    of sha256("<uid>:<seed>")), so the choice is stable across runs and machines.
    """
    if mode == "column":
        return column_caption
    if mode != "sample":
        return pc.coalesce(variants[mode], column_caption)
    valid = [pc.is_valid(variants[t]).to_numpy(zero_copy_only=False) for t in CAPTION_TEMPLATES]
    count = np.sum(valid, axis=0).astype(np.uint64)
    k = pick_hash % np.maximum(count, np.uint64(1))
    choice = np.full(len(k), len(CAPTION_TEMPLATES), np.int8)  # no template: the column caption
    seen = np.zeros(len(k), np.uint64)
    for j, v in enumerate(valid):
        choice[v & (seen == k)] = j
        seen += v.astype(np.uint64)
    return pc.choose(pa.array(choice), *(variants[t] for t in CAPTION_TEMPLATES), column_caption)
