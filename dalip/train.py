"""The DALIP training loop: `train(cfg)`. Runs single-process or under `torchrun` (DDP).

Reading order: setup (distributed, seeds, model, data, optimizer), optional resume, then one loop over
optimizer steps: fetch micro-batches → forward/backward (with open_clip's feature cache when
accumulating, so the contrastive batch is the whole accumulated batch) → skip the step if the loss is
not finite → clip, step, clamp the logit scale → log → checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

import dalip
from dalip.checkpoint import (
    list_checkpoints,
    load_meta,
    load_model_weights,
    load_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dalip.config import TrainConfig
from dalip.data import DataPosition, TrainData, build_train_data, describe_sources, expand_shards
from dalip.errors import DalipError, NonFiniteLossError
from dalip.lock import directory_lock

log = logging.getLogger(__name__)

CSV_FIELDS = (
    "step", "epoch", "samples", "loss", "loss_first", "loss_second", "lr", "logit_scale", "grad_norm",
    "samples_per_s", "skipped", "nonfinite", "bad_samples", "bad_shards",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Setup helpers


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call created the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group if there is one (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DalipError(f"device {device!r} requested but CUDA is not available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, dev, owns_group)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, the logit scale, embeddings or any <2-D tensor."""

    def exempt(name: str, p: torch.Tensor) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return (
            p.ndim < 2
            or "bias" in leaf
            or "norm" in name
            or ".ln_" in f".{name}"
            or ".bn" in f".{name}"
            or "logit_scale" in name
            or "embedding" in name
        )

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if exempt(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _all_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return values


class CsvLog:
    """train.csv, one row per optimizer step, flushed at once; on resume rows after the resume step go."""

    def __init__(self, path: Path, resume_step: int | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _progress_bar(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )  # fmt: skip
    bar.start()
    bar.add_task("train", total=total, completed=start, info="")
    return bar


def read_train_log(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a run's train.csv as floats (empty fields become NaN)."""
    with open(Path(run_dir) / "logs" / "train.csv", newline="") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train DALIP (or the CLIP baseline) as configured; returns a summary of the finished run."""
    expand_shards(cfg.train_data)  # fail fast on a wrong path, before building anything
    ddp = setup_distributed(cfg.device)
    # One training per run dir: a second `dalip train` on it refuses with one line. Rank 0 holds the
    # lock (only rank 0 writes to the run dir; a flock per rank would refuse the run's own ranks).
    with directory_lock(cfg.run_dir, "dalip train") if ddp.is_main else contextlib.nullcontext():
        return _train(cfg, ddp)


def _train(cfg: TrainConfig, ddp: Dist) -> dict[str, Any]:
    from dalip.loss import DALIPLoss
    from dalip.model import create_model

    run_dir = cfg.run_dir
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)

    # Resume target first: the data layout (slots, phases) defaults to the checkpoint's.
    ckpt_path, ckpt_state = None, None
    if cfg.resume:
        if cfg.resume == "latest" and not list_checkpoints(run_dir):
            log.info("no checkpoint in %s yet: starting from scratch", run_dir / "checkpoints")
        else:
            ckpt_path = resolve_checkpoint(cfg.resume, run_dir)
            ckpt_state = load_state(ckpt_path)
    slots, phases = cfg.data_slots, cfg.data_phases
    if ckpt_state is not None:
        saved = ckpt_state["data"]
        for name, mine, theirs in (("data_slots", slots, saved["slots"]), ("data_phases", phases, saved["phases"])):
            if mine is not None and mine != theirs:
                raise DalipError(f"{ckpt_path}: was trained with {name}={theirs}; resume with the same value")
        slots, phases = saved["slots"], saved["phases"]

    # Model, loss. Same seed on every rank, so every rank builds identical initial weights.
    model, preprocess_train, _, tokenizer = create_model(
        cfg.model, pretrained=cfg.pretrained, mbdc=cfg.mbdc.model_dump(), device=ddp.device, model_config_path=cfg.model_config_path,
        aug_cfg=cfg.augment.open_clip_cfg() if cfg.augment else None,
    )
    if cfg.loss == "clip":  # the baseline leaves the MBDC modules out of the graph: freeze them
        for module in (model.mbdc_image, model.mbdc_text):
            module.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    criterion = DALIPLoss(
        alpha=cfg.alpha, mode=cfg.loss, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
        rank=ddp.rank, world_size=ddp.world_size,
    )  # fmt: skip

    # Data.
    micro_batch = cfg.batch_size // cfg.accum_steps
    data: TrainData = build_train_data(
        cfg.train_data, transform=preprocess_train, tokenizer=tokenizer, micro_batch=micro_batch, seed=cfg.seed,
        resampled=cfg.resampled, source_weights=cfg.source_weights, caption_field=cfg.caption_field,
        num_samples=cfg.train_num_samples, shuffle_buffer=cfg.shuffle_buffer, slots=slots, phases=phases,
        num_workers=cfg.workers, step_multiple=cfg.accum_steps, rank=ddp.rank, world_size=ddp.world_size,
        pin_memory=ddp.device.type == "cuda",
    )  # fmt: skip
    owned = data.dataset.owned_streams()
    steps_per_epoch = data.steps_per_epoch // cfg.accum_steps
    total_steps = cfg.steps or (cfg.epochs or 1) * steps_per_epoch

    # Optimizer, grad scaler.
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    scaler = torch.amp.GradScaler(ddp.device.type, enabled=cfg.precision == "fp16")

    # Resume: weights, optimizer, scaler, data position, counters, RNG.
    step, position = 0, DataPosition.start(data.num_streams)
    counters = {"nonfinite_total": 0, "samples": 0}
    if ckpt_state is not None:
        load_model_weights(model, ckpt_path)
        optimizer.load_state_dict(ckpt_state["optimizer"])
        scaler.load_state_dict(ckpt_state["scaler"])
        position = DataPosition.from_state_dict(ckpt_state["data"])
        counters.update(ckpt_state["counters"])
        step = int(ckpt_state["step"])
        rngs = ckpt_state["rng"]
        set_rng_state(rngs[ddp.rank] if len(rngs) == ddp.world_size else rngs[0])
        log.info("resumed from %s at step %d (epoch %d, micro-step %d)", ckpt_path, step, position.epoch, position.step)
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # dropout etc. differ per rank; weights are already built

    train_model = model
    if ddp.world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[ddp.device.index] if ddp.device.type == "cuda" else None)

    # Logs.
    csv_log = tb = bar = None
    if ddp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        csv_log = CsvLog(run_dir / "logs" / "train.csv", step if ckpt_state is not None else None)
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run_dir / "logs" / "tensorboard"), purge_step=step if ckpt_state is not None else None)
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = _progress_bar(show, total_steps, step)
    log.info(
        "training %s (%s loss) on %d samples/epoch: %d steps of %d samples (%d micro-steps of %d), world size %d, %s",
        cfg.model, cfg.loss, data.num_samples, total_steps, cfg.batch_size, cfg.accum_steps, micro_batch,
        ddp.world_size, ddp.device,
    )  # fmt: skip

    def batches() -> Iterator[dict[str, Any]]:
        while True:
            for batch in data.loader(position):
                yield batch
            position.next_epoch(owned)

    stream = batches()
    nonfinite_run = 0
    last: dict[str, float] = {}
    window_start, window_samples = time.perf_counter(), 0
    train_model.train()
    try:
        while step < total_steps:
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            micro = []
            for _ in range(cfg.accum_steps):
                batch = next(stream)
                position.update(batch)
                micro.append((batch["images"].to(ddp.device, non_blocking=True), batch["texts"].to(ddp.device, non_blocking=True)))

            # Forward/backward. With accumulation, cache every micro-batch's features first, then
            # recompute one micro-batch at a time with gradients against the cached others.
            if cfg.accum_steps == 1:
                with autocast(cfg.precision, ddp.device):
                    total, parts = criterion(train_model(*micro[0]))
                scaler.scale(total).backward()
            else:
                with torch.no_grad(), autocast(cfg.precision, ddp.device):
                    cached = [train_model(images, texts) for images, texts in micro]
                for j, (images, texts) in enumerate(micro):
                    sync = j == len(micro) - 1 or ddp.world_size == 1
                    with (contextlib.nullcontext() if sync else train_model.no_sync()):
                        with autocast(cfg.precision, ddp.device):
                            out = train_model(images, texts)
                            joined = {
                                k: torch.cat([c[k] for c in cached[:j]] + [v] + [c[k] for c in cached[j + 1 :]])
                                for k, v in out.items() if k != "logit_scale"
                            }  # fmt: skip
                            total, parts = criterion({**joined, "logit_scale": out["logit_scale"]})
                        scaler.scale(total).backward()

            # The loss over the global batch (mean over ranks), agreed by all ranks.
            names = list(parts)
            reduced = _all_mean(torch.stack([parts[n].detach().float() for n in names]), ddp.world_size).tolist()
            losses = dict(zip(names, reduced))
            finite = math.isfinite(losses["total"])
            grad_norm = math.nan
            if finite:
                scaler.unscale_(optimizer)
                if cfg.grad_clip is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                    finite = math.isfinite(grad_norm) or cfg.precision == "fp16"  # fp16: the scaler skips it
            if finite:
                scaler.step(optimizer)
                scaler.update()
                nonfinite_run = 0
            else:
                counters["nonfinite_total"] += 1
                nonfinite_run += 1
                log.warning("step %d: non-finite loss %s, step skipped (%d in a row)", step, losses["total"], nonfinite_run)
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # as CLIP: the temperature never exceeds 100
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            counters["samples"] += cfg.batch_size
            window_samples += cfg.batch_size

            # Logs (every step to CSV; console and TensorBoard every log_every).
            bad_samples, bad_shards = position.bad_totals(owned)
            now = time.perf_counter()
            speed = window_samples / max(now - window_start, 1e-9)
            last = {
                "step": step, "epoch": position.epoch, "samples": counters["samples"], "loss": losses["total"],
                "loss_first": losses.get("loss_first", ""), "loss_second": losses.get("loss_second", ""), "lr": lr,
                "logit_scale": model.logit_scale.detach().exp().item(), "grad_norm": grad_norm, "samples_per_s": speed,
                "skipped": int(not finite), "nonfinite": counters["nonfinite_total"], "bad_samples": bad_samples,
                "bad_shards": bad_shards,
            }  # fmt: skip
            if ddp.is_main:
                csv_log.write(last)
                if bar is not None:
                    bar.update(bar.task_ids[0], completed=step, info=f"loss {losses['total']:.4f}  {speed:,.0f} samples/s")
                if step % cfg.log_every == 0 or step == total_steps:
                    for key in ("loss", "loss_first", "loss_second", "lr", "logit_scale", "grad_norm", "samples_per_s"):
                        if isinstance(last[key], float) and math.isfinite(last[key]):
                            tb.add_scalar(f"train/{key}", last[key], step)
                    tb.add_scalar("data/bad_samples", bad_samples, step)
                    tb.add_scalar("data/bad_shards", bad_shards, step)
                    if bar is None:
                        log.info(
                            "step %d/%d  loss %.4f  lr %.2e  %.0f samples/s  skipped: %d samples, %d shards, %d non-finite steps",
                            step, total_steps, losses["total"], lr, speed, bad_samples, bad_shards, counters["nonfinite_total"],
                        )  # fmt: skip
                    window_start, window_samples = time.perf_counter(), 0

            if nonfinite_run >= cfg.max_nonfinite:
                raise NonFiniteLossError(
                    f"loss was not finite for {nonfinite_run} steps in a row (last at step {step}); "
                    "lower --lr, raise --warmup, use --precision bf16 or fp32, or check the data"
                )
            if step % cfg.save_every == 0 or step == total_steps:
                _save(cfg, ddp, step, model, optimizer, scaler, position, data, counters)
    finally:
        if bar is not None:
            bar.stop()
        if csv_log is not None:
            csv_log.close()
            tb.close()
    if ddp.owns_group:
        dist.barrier()
        dist.destroy_process_group()
    return {"run_dir": str(run_dir), "step": step, **last}


def _save(cfg, ddp, step, model, optimizer, scaler, position: DataPosition, data: TrainData, counters) -> None:
    """Collective: every rank contributes its data position and RNG state; rank 0 writes."""
    owned = data.dataset.owned_streams()
    data_state = {**position.state_dict(owned), "slots": data.dataset.slots, "phases": data.dataset.phases}
    rngs = [rng_state()]
    if ddp.world_size > 1:
        rngs = [None] * ddp.world_size
        dist.all_gather_object(rngs, rng_state())
    if ddp.is_main:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": {"step": step, "warmup": cfg.warmup, "lr": cfg.lr, "min_lr": cfg.min_lr},
            "data": data_state,
            "rng": rngs,
            "counters": dict(counters),
        }
        meta = {
            "epoch": position.epoch,
            "model": cfg.model,
            "mbdc": cfg.mbdc.model_dump(),
            "model_config_path": cfg.model_config_path,
            "loss": cfg.loss,
            "alpha": cfg.alpha,
            "world_size": ddp.world_size,
            "config": cfg.model_dump(mode="json"),
            "train_data": describe_sources(data.sources),
            "versions": {"dalip": dalip.__version__, "torch": torch.__version__},
        }
        path = save_checkpoint(cfg.run_dir, step, model, state, meta, keep=cfg.keep_checkpoints)
        log.info("saved %s", path)
    if ddp.world_size > 1:
        dist.barrier()


def checkpoint_model_spec(path: Path) -> dict[str, Any]:
    """What create_model needs to rebuild a checkpoint's architecture."""
    meta = load_meta(path)
    return {"model_name": meta["model"], "mbdc": meta.get("mbdc") or None, "model_config_path": meta.get("model_config_path")}
