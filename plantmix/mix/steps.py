"""The build's mix stage, declared once: every `mix:` entry of the recipe (see plantmix.build)."""

from __future__ import annotations

from plantmix.core.stage import Stage
from plantmix.mix.run import run_mix


def mix_stage(ctx) -> Stage:
    recipe = ctx.recipe

    def run() -> bool:
        did = False
        for spec in recipe.mix:
            done_before = is_done_mix(ctx, spec)
            out = run_mix(ctx.build_dir, spec, recipe_hash=recipe.hash(), workers=recipe.resources.workers,
                          resources=recipe.resources)
            did |= not done_before
            ctx.console.print(f"  mix → {out}", highlight=False)
        return did

    return Stage(
        "mix", "selection and shards per mix", ctx.path("mixes"), run, managed=True,
        count=lambda: f"{len(recipe.mix)} mix(es)",
    )  # fmt: skip


def is_done_mix(ctx, spec) -> bool:
    """Whether the mix's final marker exists (a cheap look; run_mix checks its fingerprint itself)."""
    marker = ctx.path("mixes", spec.resolved_name(), "dataset.json")
    return marker.exists() and marker.with_name("dataset.json.done.json").exists()
