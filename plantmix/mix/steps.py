"""The build's mix stage, declared once: every `mix:` entry of the recipe (see plantmix.build)."""

from __future__ import annotations

from plantmix.core.stage import Stage
from plantmix.mix.run import mix_is_current, run_mix


def mix_stage(ctx) -> Stage:
    recipe = ctx.recipe

    def run() -> bool:
        did = False
        for spec in recipe.mix:
            current = mix_is_current(ctx.build_dir, spec, recipe.hash())
            # force: the recipe declares these mixes, so a changed entry or a rebuilt manifest replaces them
            out = run_mix(ctx.build_dir, spec, recipe_hash=recipe.hash(), workers=recipe.resources.workers,
                          resources=recipe.resources, force=True, console=ctx.console)  # fmt: skip
            did |= not current
            ctx.console.print(f"  mix → {out}", highlight=False)
        return did

    return Stage(
        "mix", "selection and shards per mix", ctx.path("mixes"), run, managed=True,
        count=lambda: f"{len(recipe.mix)} mix(es)",
    )  # fmt: skip
