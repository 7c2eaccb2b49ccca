"""Caption templates built from taxonomy (scientific, common, full taxonomic, combined)."""

from __future__ import annotations

import hashlib

from plantmix.core.schema import CAPTION_TEMPLATES, TAXON_RANKS


def _clean(v: object) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def caption_variants(taxa: dict[str, object]) -> dict[str, str | None]:
    """All template captions for one row; a template is None when its fields are missing.

    `taxa` maps `taxon_<rank>` and `common_name` to values (missing or empty = unknown).
    """
    species = _clean(taxa.get("taxon_species"))
    common = _clean(taxa.get("common_name"))
    family = _clean(taxa.get("taxon_family"))
    lineage = [(r, _clean(taxa.get(f"taxon_{r}"))) for r in TAXON_RANKS[:-1]]
    lineage = [(r, v) for r, v in lineage if v]

    scientific = f"a photo of {species}." if species else None
    common_c = f"a photo of {common}, a type of plant." if common else None
    taxonomic = None
    if species and lineage:
        taxonomic = f"a photo of {species}, " + ", ".join(f"{r} {v}" for r, v in lineage) + "."
    combined = None
    if species and common:
        combined = f"a photo of {common} ({species})" + (f", a plant of the family {family}." if family else ".")
    elif species or common:
        combined = scientific or common_c
    return {"scientific": scientific, "common": common_c, "taxonomic": taxonomic, "combined": combined}


def pick_caption(mode: str, column_caption: str | None, variants: dict[str, str | None], uid: str, seed: int) -> str | None:
    """The training caption for one row under a source's caption mode.

    `column`: the source's own caption. A template name: that template, falling back to the column
    caption when the template's fields are missing. `sample`: one of the available templates, chosen by
    a hash of (uid, seed) so the choice is stable across runs and machines.
    """
    if mode == "column":
        return column_caption
    if mode == "sample":
        options = [variants[t] for t in CAPTION_TEMPLATES if variants.get(t)]
        if not options:
            return column_caption
        h = int.from_bytes(hashlib.sha256(f"{uid}:{seed}".encode()).digest()[:8], "big")
        return options[h % len(options)]
    return variants.get(mode) or column_caption
