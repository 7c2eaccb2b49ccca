"""Training configuration: one pydantic model, filled from a YAML file and/or command-line flags.

Flags override the YAML; unknown keys are errors (a typo must not silently train the wrong thing).
Every field is typed and bounded: floats must be finite, counts have upper bounds, names are plain
file names. YAML files go through one loader (`load_yaml_mapping`) that refuses anchors/aliases and
repeated keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from dalip.errors import DalipError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}"  # a plain file name: no '/', never '.' or '..'
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d{1,3})?"


def _name(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError("must be a plain name: letters, digits, '_', '.', '-', starting with a letter or digit (no '/')")
    return value


def _device(value: str) -> str:
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
    return value


def plain_name(value: str, what: str) -> str:
    """`value` if it is a plain name (see Name), else a one-line DalipError naming `what`."""
    try:
        return _name(value)
    except ValueError as e:
        raise DalipError(f"{what}: {e} (got {value!r})") from None


Name = Annotated[str, AfterValidator(_name)]  # names files and directories: a run, a dataset, a label
Device = Annotated[str, AfterValidator(_device), Field(description="auto (cuda if available), cpu, cuda, cuda:N, mps")]
MAX_SEED = 2**63  # what torch.manual_seed accepts
# Upper bounds on counts: far above any real use, low enough that a typo cannot exhaust the machine.
MAX_BATCH, MAX_WORKERS, MAX_STEPS, MAX_SLOTS = 1 << 20, 256, 10**12, 1 << 16


class StrictConfig(BaseModel):
    """Base of dalip's config models: unknown keys are errors; NaN and infinities are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


class MBDCOptions(StrictConfig):
    """Options of the two MBDC modules (DESIGN §2.2); the defaults are the paper's."""

    heads: int = Field(4, ge=1, le=64, description="heads h (must divide the embedding width)")
    reduce_dim: int = Field(46, ge=1, le=256, description="channels d per head after the reduction")
    dropout: float = Field(0.5, ge=0, lt=1, description="channel dropout while training")
    learnable_temperature: bool = Field(False, description="learn tau = exp(t), as in DeepBDC")
    hidden_linear: bool = Field(False, description="the reference's extra out_dim x out_dim linear")


class AugmentOptions(StrictConfig):
    """Training-time image augmentation, passed to open_clip's train transform (its AugmentationCfg):
    a random resized crop, then optional colour jitter and grey scale. Unset: open_clip's default crop
    (scale 0.9-1.0) and nothing else."""

    scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        (0.9, 1.0), description="area range of the random resized crop")
    color_jitter: Optional[tuple[Annotated[float, Field(ge=0)], ...]] = Field(
        None, min_length=4, max_length=4, description="brightness, contrast, saturation, hue of the colour jitter")
    color_jitter_prob: Optional[float] = Field(None, gt=0, le=1, description="chance of the colour jitter (needs color_jitter)")
    gray_scale_prob: Optional[float] = Field(None, gt=0, le=1, description="chance of turning the image grey")

    @model_validator(mode="after")
    def _check(self) -> "AugmentOptions":
        if self.scale[0] > self.scale[1]:
            raise ValueError(f"scale {list(self.scale)}: the lower bound exceeds the upper")
        if (self.color_jitter is None) != (self.color_jitter_prob is None):
            raise ValueError("give color_jitter and color_jitter_prob together")
        return self

    def open_clip_cfg(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model_dump().items() if v is not None}


class StrictYamlLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing two things config files must not do: anchors and aliases (`&a`,
    `*a`, `<<: *a`: a few hundred bytes of nested aliases expand to gigabytes once validated) and a
    key repeated in one mapping (plain YAML keeps the last one silently)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (yaml's signature)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_error_line(err: yaml.YAMLError) -> str:
    """One line for a YAML error: what and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    what = getattr(err, "problem", None) or next(iter(str(err).splitlines()), "") or type(err).__name__
    return f"{what}{where}"


def load_yaml_mapping(path: Path | str, what: str = "config") -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}), through StrictYamlLoader; DalipError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DalipError(f"{what} file not found: {path}")
    try:
        loaded = yaml.load(path.read_text(), Loader=StrictYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError) as e:
        raise DalipError(f"{path}: cannot read {what}: {e}") from None
    except yaml.YAMLError as e:
        raise DalipError(f"{path}: not valid YAML ({yaml_error_line(e)})") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise DalipError(f"{path}: expected a mapping of {what} keys, got {type(loaded).__name__}")
    return loaded


class TrainConfig(StrictConfig):
    # run
    name: Name = Field("run", description="run name: outputs go to <runs_dir>/<name>/")
    runs_dir: Path = Field(Path("runs"), description="directory of the runs")
    seed: int = Field(0, ge=0, lt=MAX_SEED, description="seed of the weights, the data order and the augmentations")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms, seeded everything")
    device: Device = "auto"
    threads: Optional[int] = Field(None, ge=1, le=MAX_WORKERS, description="torch intra-op threads of each training process [default: torch's, one per core]; with DataLoader workers on the same cores, fewer threads than cores avoid oversubscription")

    # model
    model: str = Field("dalip-tiny", min_length=1, description="open_clip model name or a config in dalip/model_configs")
    pretrained: Optional[str] = Field(None, min_length=1, description="open_clip pretrained tag or local base-model checkpoint (safetensors, or a torch file of tensors only)")
    model_config_path: Optional[str] = Field(None, min_length=1, description="an open_clip model config JSON for an architecture open_clip does not know")
    mbdc: MBDCOptions = Field(default_factory=MBDCOptions, description="MBDC options (heads, reduce_dim, dropout, ...)")
    grad_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory)")

    augment: Optional[AugmentOptions] = Field(None, description="training image augmentation (crop scale, colour jitter, grey scale)")

    # data (see dalip.data for how the order is fixed)
    train_data: str = Field(..., min_length=1, description="shards: brace pattern, glob, directory; join sources with '::'")
    caption_field: str = Field("txt", min_length=1, description="txt, a .json key (caption_scientific, ...) or captions (a list: one drawn per sample per epoch); comma = fallback")
    resampled: bool = Field(False, description="draw shards with replacement instead of epochs")
    source_weights: Optional[list[Annotated[float, Field(ge=0)]]] = Field(None, max_length=1024, description="per '::' source, resampled mode only")
    train_num_samples: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description="samples per epoch [default: counted]")
    shuffle_buffer: int = Field(1000, ge=0, le=10**7, description="samples in the per-shard shuffle buffer")
    workers: int = Field(2, ge=0, le=MAX_WORKERS, description="DataLoader worker processes per rank")
    data_slots: Optional[int] = Field(None, ge=1, le=MAX_SLOTS, description="slices per global batch [default: world size]")
    data_phases: Optional[int] = Field(None, ge=1, le=MAX_SLOTS, description="[default: max(1, workers)]")

    # optimisation
    batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="global batch per optimizer step (all ranks, all micro-steps)")
    accum_steps: int = Field(1, ge=1, le=MAX_BATCH, description="micro-steps per optimizer step")
    epochs: Optional[int] = Field(None, ge=1, le=10**6, description="epochs to train [default: 1, unless steps is given]")
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description="total optimizer steps (overrides epochs)")
    lr: float = Field(5e-4, gt=0, le=10, description="peak learning rate (AdamW)")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine decay")
    warmup: int = Field(100, ge=0, le=MAX_STEPS, description="linear warmup steps")
    weight_decay: float = Field(0.2, ge=0, le=10, description="AdamW weight decay (not on norms, biases, embeddings, logit scale)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.98, ge=0, lt=1, description="AdamW beta2")
    eps: float = Field(1e-6, gt=0, le=1, description="AdamW epsilon")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max gradient norm; null disables")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, or autocast to bf16 / fp16")
    loss: Literal["dalip", "clip"] = Field("dalip", description="dalip (first + second order) or clip (the baseline)")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the first-order term")
    local_loss: bool = Field(True, description="DDP: each rank scores its own samples against all (open_clip's local loss)")
    gather_with_grad: bool = Field(True, description="DDP: gather features with gradients")
    max_nonfinite: int = Field(5, ge=1, le=10**6, description="abort after this many non-finite losses in a row")

    # checkpoints and logs
    save_every: int = Field(500, ge=1, le=MAX_STEPS, description="checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = Field(3, ge=1, le=10**6, description="newest checkpoints kept")
    resume: Optional[str] = Field(None, min_length=1, description="'latest' or a checkpoint directory")
    log_every: int = Field(10, ge=1, le=MAX_STEPS, description="console and TensorBoard every N steps")
    progress: Optional[bool] = Field(None, description="progress bar [default: when stderr is a terminal]")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of accum_steps {self.accum_steps}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        return self

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{source}: {where}: {msg} (got {got})" if first["loc"] else f"{source}: {msg}"


def load_train_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) with `overrides` (None values ignored) applied on
    top; a mapping override (e.g. `mbdc`) updates the file's mapping key by key."""
    values: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        values.update(load_yaml_mapping(path, "config"))
        source = str(path)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            value = {**values[key], **value}
        if value is not None:
            values[key] = value
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise DalipError(_one_line(e, source)) from None
