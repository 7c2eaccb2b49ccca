"""Training configuration: one pydantic model, filled from a YAML file and/or command-line flags.

Flags override the YAML; unknown keys are errors (a typo must not silently train the wrong thing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dalip.errors import DalipError


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # run
    name: str = Field("run", description="run name: outputs go to <runs_dir>/<name>/")
    runs_dir: Path = Path("runs")
    seed: int = 0
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms, seeded everything")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N")

    # model
    model: str = Field("dalip-tiny", description="open_clip model name or a config in dalip/model_configs")
    pretrained: Optional[str] = Field(None, description="open_clip pretrained tag or local base-model checkpoint")
    model_config_path: Optional[str] = None
    mbdc: dict[str, Any] = Field(default_factory=dict, description="MBDC options (heads, reduce_dim, dropout, ...)")
    grad_checkpointing: bool = False

    # data (see dalip.data for how the order is fixed)
    train_data: str = Field(..., description="shards: brace pattern, glob, directory; join sources with '::'")
    caption_field: str = Field("txt", description="txt, a .json key (caption_scientific, ...) or captions (a list: one drawn per sample per epoch); comma = fallback")
    resampled: bool = Field(False, description="draw shards with replacement instead of epochs")
    source_weights: Optional[list[float]] = Field(None, description="per '::' source, resampled mode only")
    train_num_samples: Optional[int] = Field(None, description="samples per epoch [default: counted]")
    shuffle_buffer: int = Field(1000, ge=0)
    workers: int = Field(2, ge=0)
    data_slots: Optional[int] = Field(None, ge=1, description="slices per global batch [default: world size]")
    data_phases: Optional[int] = Field(None, ge=1, description="[default: max(1, workers)]")

    # optimisation
    batch_size: int = Field(256, ge=1, description="global batch per optimizer step (all ranks, all micro-steps)")
    accum_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    epochs: Optional[int] = Field(None, ge=1)
    steps: Optional[int] = Field(None, ge=1, description="total optimizer steps (overrides epochs)")
    lr: float = Field(5e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup: int = Field(100, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.2, ge=0)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max gradient norm; null disables")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss: Literal["dalip", "clip"] = "dalip"
    alpha: float = Field(0.5, ge=0, le=1)
    local_loss: bool = True
    gather_with_grad: bool = True
    max_nonfinite: int = Field(5, ge=1, description="abort after this many non-finite losses in a row")

    # checkpoints and logs
    save_every: int = Field(500, ge=1, description="checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = Field(3, ge=1)
    resume: Optional[str] = Field(None, description="'latest' or a checkpoint directory")
    log_every: int = Field(10, ge=1)
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
    return f"{source}: {where}: {first['msg']} (got {first.get('input')!r})" if first["loc"] else f"{source}: {first['msg']}"


def load_train_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) with `overrides` (None values ignored) applied on top."""
    values: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DalipError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise DalipError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(loaded, dict):
            raise DalipError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
        source = str(path)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise DalipError(_one_line(e, source)) from None
