"""MixSpec: one mix, as data (DESIGN §5), validated by pydantic; recipes and the CLI build it."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from plantmix.core.errors import PlantmixError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
CAP_RANKS = ("species", "genus", "family")  # finest first: the order caps are applied in
CaptionField = Literal["caption", "caption_scientific", "caption_common", "caption_taxonomic", "caption_combined"]


class MixSpec(BaseModel):
    """One mix: how many rows of each domain, how to pick them, how to shard them.

    Give either `ratio` and `total` (plant = round(ratio * total)) or absolute `plant` / `general`.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=_NAME)
    ratio: float | None = Field(None, ge=0, le=1)
    total: int | None = Field(None, ge=1)
    plant: int | None = Field(None, ge=0)
    general: int | None = Field(None, ge=0)
    seed: int = Field(0, ge=0, lt=2**64)
    per_taxon_cap: int | None = Field(None, ge=1, description="at most K rows per species")
    per_genus_cap: int | None = Field(None, ge=1)
    per_family_cap: int | None = Field(None, ge=1)
    source_weights: dict[str, float] = Field(default_factory=dict)
    allow_repeat: bool = False
    shard_size: int = Field(10_000, ge=1)
    caption_field: CaptionField = "caption"  # written as <key>.txt; falls back to `caption` when null

    @model_validator(mode="after")
    def _one_way_to_count(self) -> "MixSpec":
        by_ratio = self.ratio is not None or self.total is not None
        by_count = self.plant is not None or self.general is not None
        if by_ratio == by_count:
            raise ValueError("give either ratio and total, or plant and/or general counts")
        if by_ratio and (self.ratio is None or self.total is None):
            raise ValueError("ratio and total go together")
        bad = {k: w for k, w in self.source_weights.items() if not (w > 0 and math.isfinite(w))}
        if bad:
            raise ValueError(f"source weights must be positive and finite: {bad}")
        return self

    def counts(self) -> dict[str, int]:
        if self.ratio is not None:
            n_plant = round(self.ratio * self.total)
            return {"plant": n_plant, "general": self.total - n_plant}
        return {"plant": self.plant or 0, "general": self.general or 0}

    def caps(self) -> list[tuple[str, int]]:
        caps = {"species": self.per_taxon_cap, "genus": self.per_genus_cap, "family": self.per_family_cap}
        return [(rank, caps[rank]) for rank in CAP_RANKS if caps[rank] is not None]

    def resolved_name(self) -> str:
        if self.name:
            return self.name
        if self.ratio is not None:
            return f"r{self.ratio:g}-n{self.total}-s{self.seed}"
        c = self.counts()
        return f"p{c['plant']}-g{c['general']}-s{self.seed}"


def make_spec(source_weights: list[str] | dict[str, float] = (), **options) -> MixSpec:
    """A MixSpec from command-line style options (`SRC=W` weights); one-line PlantmixError if invalid."""
    weights = dict(source_weights) if isinstance(source_weights, dict) else {}
    for item in source_weights if not isinstance(source_weights, dict) else ():
        src, eq, w = item.partition("=")
        try:
            weights[src.strip()] = float(w)
        except ValueError:
            eq = ""
        if not eq or not src.strip():
            raise PlantmixError(f"--source-weight expects SRC=W with a number W; got {item!r}")
    try:
        return MixSpec(source_weights=weights, **options)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "mix"
        raise PlantmixError(f"mix option '{loc}': {first['msg'].removeprefix('Value error, ')}") from None


