"""Caption templates built from taxonomy (scientific, common, full taxonomic, combined), as DuckDB
column expressions over a table of taxon columns whose blank values are already NULL.

A template is NULL when its fields are missing. Field values are used stripped of whitespace.
"""

from __future__ import annotations

from plantmix.core.duck import sql_quote
from plantmix.core.schema import CAPTION_TEMPLATES, TAXON_RANKS
from plantmix.core.text import WHITESPACE


def _field(column: str) -> str:
    """The stripped value of a column; NULL when missing or blank."""
    return f"nullif(trim({column}, {sql_quote(WHITESPACE)}), '')"


def caption_variants_sql() -> dict[str, str]:
    """template name → SQL expression of that caption, over taxon_* and common_name columns."""
    species, common, family = _field("taxon_species"), _field("common_name"), _field("taxon_family")
    lineage = "concat_ws(', ', " + ", ".join(f"'{r} ' || {_field(f'taxon_{r}')}" for r in TAXON_RANKS[:-1]) + ")"
    scientific = f"'a photo of ' || {species} || '.'"
    common_c = f"'a photo of ' || {common} || ', a type of plant.'"
    taxonomic = f"CASE WHEN {species} IS NOT NULL AND {lineage} <> '' THEN 'a photo of ' || {species} || ', ' || {lineage} || '.' END"
    combined = (
        f"CASE WHEN {species} IS NOT NULL AND {common} IS NOT NULL "
        f"THEN 'a photo of ' || {common} || ' (' || {species} || ')' "
        f"|| coalesce(', a plant of the family ' || {family} || '.', '.') "
        f"ELSE coalesce({scientific}, {common_c}) END"
    )
    variants = {"scientific": scientific, "common": common_c, "taxonomic": taxonomic, "combined": combined}
    assert tuple(variants) == CAPTION_TEMPLATES
    return variants


def pick_caption_sql(mode: str, seed: int) -> str:
    """SQL for the training caption under a source's caption mode, over `caption`, `uid` and the
    `caption_<template>` columns.

    `column`: the source's own caption. A template name: that template, falling back to the column
    caption when the template's fields are missing. `sample`: one of the available templates, chosen by
    the first 8 bytes of sha256("<uid>:<seed>") (big-endian) modulo their number, so the choice is
    stable across runs and machines.
    """
    if mode == "column":
        return "caption"
    if mode == "sample":
        options = "list_filter([" + ", ".join(f"caption_{t}" for t in CAPTION_TEMPLATES) + "], lambda x: x IS NOT NULL)"
        pick = f"('0x' || substr(sha256(uid || {sql_quote(f':{seed}')}), 1, 16))::UBIGINT % len({options})"
        return f"CASE WHEN len({options}) = 0 THEN caption ELSE {options}[({pick} + 1)::BIGINT] END"
    if mode not in CAPTION_TEMPLATES:
        raise ValueError(f"unknown caption mode {mode!r}")
    return f"coalesce(caption_{mode}, caption)"
