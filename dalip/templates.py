"""Prompt templates for zero-shot classification.

A template is a format string with one `{}` for the class name. A class's text embedding is the mean of
its normalised embeddings over all (template, name) pairs — the usual prompt ensemble.
"""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from dalip.errors import DalipError

# The 80 prompts of the CLIP paper and open_clip's 7-prompt subset, as format strings.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
SIMPLE_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)

# Plant, fungus and plant-disease prompts: field photos, herbarium sheets, leaf close-ups.
PLANT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a photo of {}, a type of plant.",
    "a photo of the plant {}.",
    "a close-up photo of a leaf of {}.",
    "a photo of the flower of {}.",
    "a photo of {} growing in the wild.",
    "a field photo of {}.",
    "a herbarium specimen of {}.",
    "a botanical illustration of {}.",
    "a cropped photo of {}.",
    "a low resolution photo of {}.",
    "a bright photo of {}.",
    "a dark photo of {}.",
    "a photo of a {} plant in a garden.",
    "a photo of a leaf showing {}.",
    "a photo of {}, a type of fungus.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "plant": PLANT_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "name": ("{}",),
}


def get_templates(name: str) -> tuple[str, ...]:
    """A named template set; `a+b` joins sets (e.g. `plant+simple`)."""
    out: list[str] = []
    for part in name.split("+"):
        if part not in TEMPLATE_SETS:
            raise DalipError(f"unknown template set {part!r}; choose from {', '.join(TEMPLATE_SETS)}")
        out += [t for t in TEMPLATE_SETS[part] if t not in out]
    return tuple(out)


def default_templates(domain: str) -> str:
    """The template set a dataset of this domain uses unless told otherwise."""
    return "plant" if domain == "plant" else "imagenet"
