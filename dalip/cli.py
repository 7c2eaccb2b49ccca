"""The `dalip` command line: train, eval, export. A thin layer over dalip.train / evaluate / export."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from dalip import DalipError

app = typer.Typer(
    name="dalip",
    help="Train and evaluate DALIP (CLIP + second-order MBDC alignment) on plantmix shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _setup_logging() -> None:
    import os

    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s" if rank == "0" else f"[rank {rank}] %(message)s", stream=sys.stderr)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override its values."),
    train_data: Optional[str] = typer.Option(None, "--train-data", help="Shards: brace pattern, glob or directory; '::' joins sources."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name: outputs go to <runs-dir>/<name>/."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir"),
    model: Optional[str] = typer.Option(None, "--model", help="open_clip model or dalip config (dalip-tiny)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip tag or local base-model checkpoint."),
    caption_field: Optional[str] = typer.Option(None, "--caption-field", help="txt, a .json key, or captions (one of the group's captions per epoch, else txt); comma = fallbacks; default: txt."),
    resampled: Optional[bool] = typer.Option(None, "--resampled/--epochs-mode", help="Draw shards with replacement."),
    train_num_samples: Optional[int] = typer.Option(None, "--train-num-samples"),
    workers: Optional[int] = typer.Option(None, "--workers"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch per optimizer step."),
    accum_steps: Optional[int] = typer.Option(None, "--accum-steps"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimizer steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    warmup: Optional[int] = typer.Option(None, "--warmup"),
    weight_decay: Optional[float] = typer.Option(None, "--wd"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or fp16."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing"),
    loss: Optional[str] = typer.Option(None, "--loss", help="dalip or clip."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Weight of the first-order term."),
    mbdc_dropout: Optional[float] = typer.Option(None, "--mbdc-dropout"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic"),
    device: Optional[str] = typer.Option(None, "--device"),
    data_slots: Optional[int] = typer.Option(None, "--data-slots", help="Slices per global batch [world size]."),
    data_phases: Optional[int] = typer.Option(None, "--data-phases", help="[max(1, workers)]"),
    save_every: Optional[int] = typer.Option(None, "--save-every"),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints"),
    log_every: Optional[int] = typer.Option(None, "--log-every"),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint directory."),
    max_nonfinite: Optional[int] = typer.Option(None, "--max-nonfinite", help="Abort after K non-finite losses in a row."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """Train DALIP (or the CLIP baseline with --loss clip). Run under `torchrun` for DDP."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "mbdc_dropout")}
    from dalip.config import load_train_config
    from dalip.train import train as run_training

    _setup_logging()
    cfg = load_train_config(config, overrides)
    if mbdc_dropout is not None:
        cfg = cfg.model_copy(update={"mbdc": {**cfg.mbdc, "dropout": mbdc_dropout}})
    summary = run_training(cfg)
    if summary.get("loss") is not None:
        console.print(f"done: step {summary['step']}, loss {summary['loss']:.4f}; run in {summary['run_dir']}")
    else:
        console.print(f"nothing to do: {summary['run_dir']} is already at step {summary['step']}")


@app.command("eval")
def eval_(
    checkpoint: str = typer.Argument(..., help="A dalip run (its latest checkpoint), checkpoint or export directory, an open_clip export directory, or an open_clip ARCH[:PATH]."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML: datasets, retrieval, alpha, ..."),
    imagefolder: List[str] = typer.Option([], "--imagefolder", help="ImageFolder dir (classnames.json inside is used)."),
    domain: str = typer.Option("plant", "--domain", help="Domain of the --imagefolder sets: plant or general."),
    dataset: List[str] = typer.Option([], "--dataset", help="name=..,path=..,domain=..,classnames=..,class_field=..,templates=.."),
    retrieval: List[str] = typer.Option([], "--retrieval", help="Held-out shards for retrieval (or name=..,shards=..,caption_field=..)."),
    validation: List[str] = typer.Option([], "--validation", help="Per-domain validation loss: name=..,shards=..,domain=..[,caption_field=..]."),
    loss_batch_size: Optional[int] = typer.Option(None, "--loss-batch-size", help="Pairs per fixed validation-loss batch (default: 32)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Combined similarity weight of s1."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    workers: Optional[int] = typer.Option(None, "--workers"),
    device: Optional[str] = typer.Option(None, "--device"),
    label: Optional[str] = typer.Option(None, "--label", help="Row label in the table [run name]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output dir; results kept per checkpoint step in step_NNNNNNNN/; default: the run dir's eval/, else eval/MODEL."),
) -> None:
    """Zero-shot top-1 (top-5 with more than 5 classes), per-class accuracy, confusion PNGs and retrieval R@K;
    writes results.json and a paper-style results.md per checkpoint step."""
    import yaml
    from pydantic import ValidationError

    from dalip.evaluate import DatasetSpec, EvalConfig, RetrievalSpec, evaluate, parse_spec, write_results
    from dalip.validation import ValidationSpec

    _setup_logging()
    values = {}
    if config is not None:
        if not config.is_file():
            raise DalipError(f"eval config not found: {config}")
        values = yaml.safe_load(config.read_text()) or {}
    values.update({k: v for k, v in {"alpha": alpha, "batch_size": batch_size, "workers": workers, "device": device, "loss_batch_size": loss_batch_size}.items() if v is not None})
    try:
        cfg = EvalConfig(**values)
    except ValidationError as e:
        first = e.errors()[0]
        raise DalipError(f"{config or 'eval options'}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    for path in imagefolder:
        cfg.datasets.append(DatasetSpec(name=Path(path.rstrip("/")).name, path=path, kind="imagefolder", domain=domain))
    cfg.datasets += [parse_spec(s, DatasetSpec) for s in dataset]
    cfg.retrieval += [parse_spec(s, RetrievalSpec) for s in retrieval]
    cfg.validation += [parse_spec(s, ValidationSpec) for s in validation]
    results = evaluate(checkpoint, cfg, label=label)
    if out is None:
        is_checkpoint = results["model_kind"] == "dalip-checkpoint"
        out = Path(results["checkpoint"]).parent.parent / "eval" if is_checkpoint else Path("eval") / results["label"]
    json_path, md_path = write_results(results, out)
    print(md_path.read_text())
    console.print(f"wrote {json_path} and {md_path}")


def _split_list(text: str, what: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DalipError(f"{what}: expected a comma-separated list, got {text!r}") from None


@app.command()
def adapt(
    model: str = typer.Argument(..., help="A dalip run, checkpoint or export directory, an open_clip export directory, or ARCH[:PATH]."),
    dataset: str = typer.Option(..., "--dataset", help="Path, or name=..,path=..,kind=..,classnames=..,class_field=..,templates=..; ImageFolder, shards, CLIP_benchmark or csv."),
    test: Optional[str] = typer.Option(None, "--test", help="Explicit test split (same syntax); default: a seeded split of --dataset."),
    shots: str = typer.Option("1,2,4,8,16", "--shots", help="Labelled images per class."),
    folds: int = typer.Option(5, "--folds", help="Support sets drawn per shot count, each with its own seed."),
    methods: str = typer.Option("zero-shot,linear-probe,tip,tip-f,dac", "--methods", help="Comma-separated methods."),
    features: str = typer.Option("first", "--features", help="first, second or combined (second and combined: DALIP models only)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the first order in combined features."),
    test_fraction: float = typer.Option(0.5, "--test-fraction", help="Share of each class held out as test when there is no --test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the test split and of the folds."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass when computing features."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers when computing features."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dir: adapt.json, adapt.md, adapt.png, splits.json, features/ (cache)."),
) -> None:
    """Few-shot adaptation of a frozen model (DAC, Tip-Adapter, Tip-Adapter-F, linear probe, zero-shot)."""
    from pydantic import ValidationError

    from dalip.adapt import AdaptConfig, run_adapt
    from dalip.evaluate import DatasetSpec, parse_spec

    _setup_logging()
    values = dict(
        shots=_split_list(shots, "--shots", int), methods=_split_list(methods, "--methods"), folds=folds,
        features=features, alpha=alpha, test_fraction=test_fraction, seed=seed, batch_size=batch_size,
        workers=workers, device=device,
    )  # fmt: skip
    try:
        cfg = AdaptConfig(dataset=parse_spec(dataset, DatasetSpec), test=parse_spec(test, DatasetSpec) if test else None, **values)
    except ValidationError as e:
        first = e.errors()[0]
        raise DalipError(f"--{'.'.join(map(str, first['loc'])).replace('_', '-')}: {first['msg'].removeprefix('Value error, ')}") from None
    report = run_adapt(model, cfg, out)
    print((out / "adapt.md").read_text())
    console.print(f"wrote {out}/adapt.json, adapt.md, adapt.png ({report['seconds']} s)")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
) -> None:
    """Write an open_clip-loadable checkpoint of the base model (MBDC weights alongside)."""
    from dalip.export import export_checkpoint

    paths = export_checkpoint(checkpoint, out)
    info = json.loads(paths["info"].read_text())
    console.print(f"wrote {out}: load with {info['usage']} (paths relative to {out})")


def _one_line(err: DalipError) -> str:
    """A DataLoader worker re-raises our error with its traceback in the message: keep the last line."""
    msg = str(err).strip()
    if "Original Traceback" in msg:
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return msg.splitlines()[0] if msg else type(err).__name__


def main() -> None:
    try:
        app()
    except DalipError as e:
        console.print(f"[bold red]error:[/] {_one_line(e)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun with --resume latest to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
