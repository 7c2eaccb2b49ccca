"""Recipes: YAML files validated by pydantic. A bad recipe fails with one line naming file and field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dalip.config import StrictYamlLoader, yaml_error_line
from plantmix.ablate import AblationConfig
from plantmix.core.errors import PlantmixError
from plantmix.mix.spec import MixSpec
from plantmix.core.schema import CAPTION_TEMPLATES

CaptionTemplate = Literal["scientific", "common", "taxonomic", "combined", "sample", "column"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoWorldConfig(_Strict):
    """The embedded demo world (DESIGN §7): generated, served on loopback, then ingested like any source."""

    species: int = Field(16, ge=2)
    images_per_species: int = Field(24, ge=2)
    heldout_per_species: int = Field(8, ge=1)
    # Per-domain validation (plantmix.demo.validation): image-caption pairs and a scene classification
    # set; 0 writes none (small test worlds stay small; pipelines/demo.yaml turns them on).
    validation_per_species: int = Field(0, ge=0)
    general_validation: int = Field(0, ge=0)
    classify_per_class: int = Field(0, ge=0)
    general_images: int = Field(240, ge=0)
    # The pretraining pool (pretrain/, plantmix.demo.validation.write_pretrain) holds this many times the
    # lists' own drawings per domain: the demo's scorer is bootstrapped on it (configs/dalip-scorer.yaml).
    pretrain_factor: int = Field(2, ge=1, le=64)
    image_size: int = Field(192, ge=32)
    seed: int = 0
    # About this share of URL-list rows carry a planted fault; while > 0, every fault kind appears at least once.
    fault_rate: float = Field(0.25, ge=0, le=0.5)
    # How long the server stalls `timeout` rows; the download timeout must be shorter to see them fail.
    timeout_delay_s: float = Field(6.0, gt=0, le=8)


class SourceConfig(_Strict):
    """One input source. `path` may use `{demo}` for the generated demo world's directory."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    domain: Literal["plant", "general"]
    format: Literal["url_list", "image_folder", "image_text_folder", "webdataset"]
    path: str
    # url_list: mapping from our column names to the file's (e.g. {url: URL, caption: TEXT}).
    columns: dict[str, str] = Field(default_factory=dict)
    # For csv/tsv/parquet/jsonl url lists; inferred from the file extension when omitted.
    file_format: Literal["csv", "tsv", "parquet", "jsonl"] | None = None
    caption: CaptionTemplate = "column"
    # image_folder: optional csv mapping `folder` → taxon_* / common_name columns.
    taxonomy: str | None = None
    license: str | None = None
    attribution: str | None = None
    priority: int = 0  # dedup keep rule: higher priority wins
    max_rows: int | None = Field(None, ge=1)
    # For planning only (`plantmix build --dry-run`): rows the source is expected to hold.
    expected_rows: int | None = Field(None, ge=0)
    # Where users obtain the source (documentation for catalogs and dataset cards).
    homepage: str | None = None

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        from plantmix.stages.sources import MAPPABLE_COLUMNS

        unknown = sorted(set(v) - set(MAPPABLE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown target column(s) {unknown}; mappable: {sorted(MAPPABLE_COLUMNS)}")
        return v


class DownloadConfig(_Strict):
    """How sources are downloaded: img2dataset's settings, and the guards plantmix adds to its fetch."""

    distributor: Literal["multiprocessing", "pyspark"] = "multiprocessing"
    processes_count: int = Field(2, ge=1)
    thread_count: int = Field(32, ge=1)
    number_sample_per_shard: int = Field(1000, ge=1)
    image_size: int = Field(512, ge=16)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    timeout: float = Field(10, gt=0)
    retries: int = Field(1, ge=0)
    min_image_size: int = Field(0, ge=0)
    max_image_area: float = Field(64_000_000, gt=0)
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    allowed_schemes: list[str] = Field(default_factory=lambda: ["http", "https"])
    user_agent_token: str | None = "plantmix"
    # Guards of plantmix's fetch (plantmix.stages.safe_fetch), on every URL and every redirect hop:
    # a response body over max_bytes is refused (Content-Length first, then while streaming) ...
    max_bytes: int = Field(50_000_000, ge=1)
    # ... as is a URL still unfinished after `deadline` seconds of wall clock, redirects and retries
    # included (`timeout` bounds each socket wait only, so a server dripping bytes never trips it);
    # null: 3 x timeout.
    deadline: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Hops to loopback, private, link-local or otherwise non-public addresses are refused unless this
    # is true or the host (`name` or `name:port`) is listed in allowed_hosts; the demo world's own
    # server (host:port) is always allowed, and nothing else on loopback.
    allow_private_hosts: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        from plantmix.stages.safe_fetch import FetchPolicy

        FetchPolicy.parse_hosts(v)  # raises ValueError naming the bad entry
        return v

    @property
    def effective_deadline(self) -> float:
        return self.deadline if self.deadline is not None else 3 * self.timeout


class DedupConfig(_Strict):
    exact: bool = True
    near: bool = True
    # Chosen on the demo world's planted near-duplicates (re-encoded, resized, 1-3 % cropped): radius 8
    # finds all of them while distinct images there stay >= 13 bits apart. At web scale, 4-6 is faster.
    phash_radius: int = Field(8, ge=0, le=16)
    # Also compare each image with the mirror image of the others, so flipped copies are near twins.
    mirror: bool = True


class FilterConfig(_Strict):
    min_side: int = Field(64, ge=0)
    max_aspect_ratio: float = Field(4.0, ge=1)
    caption_min_words: int = Field(2, ge=0)
    caption_max_words: int = Field(120, ge=1)
    caption_min_chars: int = Field(5, ge=0)
    caption_max_chars: int = Field(1000, ge=1)
    # Captions whose share of letters (any script) is below this are treated as garbage.
    caption_min_letter_ratio: float = Field(0.5, ge=0, le=1)
    # Unicode scripts allowed in captions (e.g. [LATIN]); empty = any script. A letter's script is the
    # first word of its Unicode name (LATIN, CYRILLIC, CJK, GREEK, ...).
    caption_scripts: list[str] = Field(default_factory=list)
    # With caption_scripts set: a caption whose share of letters outside them exceeds this is dropped.
    caption_max_foreign_letter_ratio: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> "FilterConfig":
        if self.caption_min_words > self.caption_max_words:
            raise ValueError("caption_min_words exceeds caption_max_words")
        if self.caption_min_chars > self.caption_max_chars:
            raise ValueError("caption_min_chars exceeds caption_max_chars")
        return self


class ScorerConfig(_Strict):
    """The model whose embeddings the model-based curation reads (plantmix.embed).

    `model` is an open_clip tag `open_clip:ARCH/PRETRAINED` (weights from the user's open_clip / Hugging
    Face cache), a local checkpoint `open_clip:ARCH//abs/path/to/weights` (ARCH a stock open_clip
    architecture or one whose config JSON lies beside the weights), or a `dalip export` directory.
    Relative paths are relative to the recipe's directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # hashable: one loaded model per configuration

    model: str = Field(min_length=1)
    batch_size: int = Field(256, ge=1, le=65_536)
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    num_workers: int = Field(2, ge=0, le=64)  # image decoding processes of the inference reader


PerDomainFloat = dict[Literal["plant", "general"], float]


class ClipScoreConfig(_Strict):
    """Image-caption similarity filter (drop reason clip_score_low), per domain: a fixed minimum
    cosine, or keep the top fraction of the domain's scored rows (DataComp's way: fraction → threshold
    by sorting). A domain named in neither keeps every row (the score is still recorded)."""

    min: PerDomainFloat = Field(default_factory=dict)
    top_fraction: PerDomainFloat = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> "ClipScoreConfig":
        for domain, f in self.top_fraction.items():
            if not 0 < f <= 1:
                raise ValueError(f"top_fraction for {domain} must lie in (0, 1]; got {f}")
        for domain, v in self.min.items():
            if not -1 <= v <= 1:
                raise ValueError(f"min for {domain} is a cosine and must lie in [-1, 1]; got {v}")
        both = sorted(set(self.min) & set(self.top_fraction))
        if both:
            raise ValueError(f"give min or top_fraction per domain, not both: {both}")
        return self


SUPPORT_FIELDS = {"plant": "support_dir", "general": "general_support_dir"}  # relevance's support folders by side


class RelevanceConfig(_Strict):
    """Plant relevance (plant_score): similarity to plant prototypes vs general ones, in [0, 1].

    Plant prototypes: the build's taxon names in the caption templates plus `plant_prompts`, and the
    images of `support_dir` when given; general prototypes: `general_prompts`. A general row scoring
    at least `threshold` is `plant_in_general` (dropped, or moved to the plant domain with `route:
    move`); a plant row below it is `not_a_plant`. `centroids` > 0 adds DataComp-style routing: faiss
    k-means over the pool, rows in clusters whose centroid lies nearest the plant prototypes count as
    plants.

    plant_score = exp(s_p / T) / (exp(s_p / T) + exp(s_g / T)), s_p and s_g the image's largest cosine
    to a plant and to a general prototype, T = `temperature` (0.01: CLIP's logit scale of 100). With
    `support_k` > 0 it comes from images alone, a k-nearest-neighbour vote: (m_p - m_g + 1) / 2, m_p and
    m_g the mean cosine of the image's k nearest `support_dir` and `general_support_dir` images.
    """

    threshold: float = Field(0.5, ge=0, le=1)
    check: list[Literal["plant", "general"]] = Field(default_factory=lambda: ["plant", "general"])
    route: Literal["drop", "move"] = "drop"
    plant_prompts: list[str] = Field(default_factory=lambda: [
        "a photo of a plant", "a photo of a leaf", "a close-up photo of leaves", "a photo of a flower",
    ])  # fmt: skip
    general_prompts: list[str] = Field(default_factory=lambda: [
        "a photo of an object", "a photo of a scene", "a photo of a building", "a photo of a vehicle",
    ])  # fmt: skip
    support_dir: str | None = None  # plant images (relative to the recipe, may use {demo}); class subfolders allowed
    general_support_dir: str | None = None  # images that are not plants, likewise (read with support_k)
    support_k: int = Field(0, ge=0)  # > 0: plant_score by the k nearest support images of each side
    centroids: int = Field(0, ge=0)
    temperature: float = Field(0.01, gt=0, le=1)

    @model_validator(mode="after")
    def _supports(self) -> "RelevanceConfig":
        if self.support_k and not (self.support_dir and self.general_support_dir):
            raise ValueError("support_k needs both support_dir (plant images) and general_support_dir (other images)")
        if self.general_support_dir and not self.support_k:
            raise ValueError("general_support_dir is read only by the nearest-neighbour score: set support_k > 0")
        return self

    def support_dirs(self) -> dict[str, str]:
        """The support folders given, by the side they stand for (plant, general)."""
        return {side: getattr(self, key) for side, key in SUPPORT_FIELDS.items() if getattr(self, key)}


class SemanticDedupConfig(_Strict):
    """SemDeDup: faiss k-means on image embeddings; within a cluster, a pair with cosine > 1 - epsilon is
    a semantic duplicate (drop reason duplicate_semantic, keep rule of the decision step)."""

    epsilon: float = Field(0.05, gt=0, lt=1)
    clusters: int = Field(0, ge=0)  # 0: about sqrt(rows / 20), at least 1
    report_epsilons: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2])


class DecontaminateConfig(_Strict):
    """Rows overlapping an evaluation set (exact sha256, pHash within the radius, or image embedding
    cosine at least `embedding_cosine`) get drop reason eval_overlap and the set's name."""

    eval_sets: list[str] = Field(min_length=1)  # image folders; relative paths from the recipe; may use {demo}
    phash_radius: int = Field(10, ge=0, le=32)
    embedding_cosine: float | None = Field(0.95, gt=0, le=1)  # null: hashes only (no scorer needed)


_MEMORY_SIZE = r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$"


class ResourcesConfig(_Strict):
    """What the non-network stages may use of this machine (DuckDB, Arrow compute, process pools)."""

    threads: int = Field(2, ge=1)  # DuckDB and Arrow compute threads
    memory_limit: str = Field("4GB", pattern=_MEMORY_SIZE)  # DuckDB's limit; beyond it, it spills to disk
    # Where DuckDB spills; relative paths are relative to the build directory. Default: <build>/.spill.
    spill_dir: str | None = None
    workers: int = Field(2, ge=1)  # processes for pHashing and shard writing
    # Ingest reads and normalises sources this many rows at a time: its memory is bounded by this.
    batch_rows: int = Field(100_000, ge=1_000)


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    demo_world: DemoWorldConfig | None = None
    sources: list[SourceConfig] = Field(min_length=1)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    # Model-based curation (each needs `scorer`, except decontamination by hashes alone).
    scorer: ScorerConfig | None = None
    clip_score: ClipScoreConfig | None = None
    relevance: RelevanceConfig | None = None
    semantic_dedup: SemanticDedupConfig | None = None
    decontaminate: DecontaminateConfig | None = None
    mix: list[MixSpec] | None = None  # run in order after the filter stage (plantmix.mix.run_mix)
    ablation: AblationConfig | None = None  # `plantmix ablate` (plantmix.ablate); not part of the build

    @model_validator(mode="after")
    def _unique_sources(self) -> "Recipe":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        mixes = [m.resolved_name() for m in self.mix or []]
        dup = sorted({n for n in mixes if mixes.count(n) > 1})
        if dup:  # two entries would write one directory, each replacing the other on every rerun
            raise ValueError(f"mix names must be unique; repeated: {dup}")
        if any("{demo}" in s.path for s in self.sources) and self.demo_world is None:
            raise ValueError("a source path uses {demo} but the recipe has no demo_world section")
        folders = [*(self.decontaminate.eval_sets if self.decontaminate else []),
                   *(self.relevance.support_dirs().values() if self.relevance else [])]  # fmt: skip
        if any("{demo}" in f for f in folders) and self.demo_world is None:
            raise ValueError("an eval set or support_dir uses {demo} but the recipe has no demo_world section")
        needs = [n for n in ("clip_score", "relevance", "semantic_dedup") if getattr(self, n) is not None]
        if self.decontaminate is not None and self.decontaminate.embedding_cosine is not None:
            needs.append("decontaminate.embedding_cosine")
        if needs and self.scorer is None:
            raise ValueError(f"{', '.join(needs)} need(s) a scorer model: add a scorer section")
        return self

    @property
    def has_model_checks(self) -> bool:
        """Whether the build runs the score stage (a model-based curation section is set)."""
        return any(getattr(self, n) is not None for n in MODEL_CHECKS)

    def hash(self) -> str:
        """Hash of the resolved recipe (defaults included), stable across key order and formatting.

        `resources` and `ablation` are left out: how much of a machine a build uses, and what
        ablations are run on it, never change what it builds.
        """
        resolved = self.model_dump(mode="json", exclude={"resources", "ablation"})
        for section in _OPTIONAL_SECTIONS:  # absent sections leave the hash of older recipes unchanged
            if resolved.get(section) is None:
                resolved.pop(section, None)
        blob = json.dumps(resolved, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


MODEL_CHECKS = ("clip_score", "relevance", "semantic_dedup", "decontaminate")  # the score stage's sections
_OPTIONAL_SECTIONS = ("scorer", *MODEL_CHECKS)


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    return f"{path}: field '{loc}': {msg}{more}"


def load_yaml(path: str | Path, what: str = "recipe") -> object:
    """A user YAML file (recipe, ablation) through dalip's StrictYamlLoader (no anchors or aliases, no
    repeated keys; one loader for both packages); one-line PlantmixError naming file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlantmixError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlantmixError(f"{path}: cannot read {what}: {e}") from None
    try:
        return yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise PlantmixError(f"{path}: invalid YAML: {yaml_error_line(e)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; raise PlantmixError with one clear line on any problem."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise PlantmixError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise PlantmixError(_format_error(path, e)) from None


assert set(CAPTION_TEMPLATES) <= set(CaptionTemplate.__args__)  # type: ignore[attr-defined]
