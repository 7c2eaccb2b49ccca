"""The `dalip` command line: train, eval, export. A thin layer over dalip.train / evaluate / export."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any, List, Optional

import typer
from pydantic import BaseModel
from rich.console import Console

from dalip import DalipError
from dalip.config import MBDCOptions, TrainConfig, plain_name
from dalip.atomic import check_output_dir
from dalip.errors import first_line

app = typer.Typer(
    name="dalip",
    help="Train and evaluate DALIP (CLIP + second-order MBDC alignment) on plantmix shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich markup would eat every "[default: ...]" of our help texts
)
console = Console(stderr=True)


def _setup_logging() -> None:
    import os

    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s" if rank == "0" else f"[rank {rank}] %(message)s", stream=sys.stderr)


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, BaseModel):
        return ", ".join(f"{k}={_default_text(v)}" for k, v in value.model_dump().items())
    return "none" if value is None else str(value)


def _field_help(model: type[BaseModel], field: str, text: str | None = None) -> str:
    """A field's description (or `text`) with its default, so the help never disagrees with the config."""
    info = model.model_fields[field]
    text = (text or info.description or field.replace("_", " ")).rstrip(".")
    if "[default:" not in text:
        text += f" [default: {_default_text(info.get_default(call_default_factory=True))}]"
    return text + "."


def _opt(field: str, *flags: str, text: str | None = None) -> Any:
    """A `dalip train` flag overriding TrainConfig.<field> (None: keep the YAML's or the default)."""
    return typer.Option(None, *flags, help=_field_help(TrainConfig, field, text))


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override its values."),
    train_data: Optional[str] = _opt("train_data", "--train-data", text="shards: brace pattern, glob, directory or mix dir; '::' joins sources [default: from --config]"),
    name: Optional[str] = _opt("name", "--name"),
    runs_dir: Optional[Path] = _opt("runs_dir", "--runs-dir"),
    model: Optional[str] = _opt("model", "--model"),
    pretrained: Optional[str] = _opt("pretrained", "--pretrained"),
    caption_field: Optional[str] = _opt("caption_field", "--caption-field"),
    resampled: Optional[bool] = _opt("resampled", "--resampled/--epochs-mode"),
    train_num_samples: Optional[int] = _opt("train_num_samples", "--train-num-samples"),
    workers: Optional[int] = _opt("workers", "--workers"),
    batch_size: Optional[int] = _opt("batch_size", "--batch-size"),
    accum_steps: Optional[int] = _opt("accum_steps", "--accum-steps"),
    epochs: Optional[int] = _opt("epochs", "--epochs"),
    steps: Optional[int] = _opt("steps", "--steps"),
    lr: Optional[float] = _opt("lr", "--lr"),
    warmup: Optional[int] = _opt("warmup", "--warmup"),
    weight_decay: Optional[float] = _opt("weight_decay", "--wd"),
    grad_clip: Optional[float] = _opt("grad_clip", "--grad-clip"),
    precision: Optional[str] = _opt("precision", "--precision"),
    grad_checkpointing: Optional[bool] = _opt("grad_checkpointing", "--grad-checkpointing/--no-grad-checkpointing"),
    loss: Optional[str] = _opt("loss", "--loss"),
    alpha: Optional[float] = _opt("alpha", "--alpha"),
    mbdc_dropout: Optional[float] = typer.Option(None, "--mbdc-dropout", help=_field_help(MBDCOptions, "dropout", "MBDC channel dropout while training")),
    seed: Optional[int] = _opt("seed", "--seed"),
    deterministic: Optional[bool] = _opt("deterministic", "--deterministic/--no-deterministic"),
    device: Optional[str] = _opt("device", "--device", text="auto (cuda if available), cpu, cuda, cuda:N or mps"),
    threads: Optional[int] = _opt("threads", "--threads"),
    data_slots: Optional[int] = _opt("data_slots", "--data-slots"),
    data_phases: Optional[int] = _opt("data_phases", "--data-phases", text="phases per data slot, each read by one worker [default: max(1, workers)]"),
    save_every: Optional[int] = _opt("save_every", "--save-every"),
    keep_checkpoints: Optional[int] = _opt("keep_checkpoints", "--keep-checkpoints"),
    log_every: Optional[int] = _opt("log_every", "--log-every"),
    resume: Optional[str] = _opt("resume", "--resume", text="'latest' (the run's newest checkpoint, or a fresh start when it has none) or a checkpoint directory"),
    max_nonfinite: Optional[int] = _opt("max_nonfinite", "--max-nonfinite"),
    progress: Optional[bool] = _opt("progress", "--progress/--no-progress"),
) -> None:
    """Train DALIP (or the CLIP baseline with --loss clip). Run under `torchrun` for DDP. One
    training per run directory at a time (a second one refuses)."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "mbdc_dropout")}
    if mbdc_dropout is not None:
        overrides["mbdc"] = {"dropout": mbdc_dropout}
    from dalip.config import load_train_config
    from dalip.train import train as run_training

    _setup_logging()
    cfg = load_train_config(config, overrides)
    summary = run_training(cfg)
    if summary.get("loss") is not None:
        console.print(f"done: step {summary['step']}, loss {summary['loss']:.4f}; run in {summary['run_dir']}")
    else:
        console.print(f"nothing to do: {summary['run_dir']} is already at step {summary['step']}")


def _config_only_keys(model: type[BaseModel], flagged: set[str], prefix: str = "") -> list[str]:
    """`key: description [default: ...]` of every field of `model` without a flag, sections unfolded."""
    lines = []
    for name, info in model.model_fields.items():
        key = prefix + name
        if key in flagged:
            continue
        lines.append(textwrap.fill(f"{key}: {_field_help(model, name)}", 78, initial_indent="  ", subsequent_indent="      "))
        section = next((t for t in getattr(info.annotation, "__args__", (info.annotation,)) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None:
            lines += _config_only_keys(section, flagged, key + ".")
    return lines


def _train_epilog() -> str:
    import inspect

    flagged = set(inspect.signature(train).parameters) | {"mbdc.dropout"}
    # "\b" keeps click from rewrapping the list into one paragraph
    return "\b\nKeys of the --config file that have no flag:\n" + "\n".join(_config_only_keys(TrainConfig, flagged))


next(c for c in app.registered_commands if c.callback is train).epilog = _train_epilog()


@app.command("eval")
def eval_(
    checkpoint: str = typer.Argument(..., help="A dalip run (its latest checkpoint), checkpoint or export directory, an open_clip export directory, or an open_clip ARCH[:PATH]."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML: datasets, retrieval, validation, alpha, ...; flags override it."),
    imagefolder: List[str] = typer.Option([], "--imagefolder", help="ImageFolder dir (classnames.json inside is used); repeatable."),
    domain: str = typer.Option("plant", "--domain", help="Domain of the --imagefolder sets: plant or general."),
    dataset: List[str] = typer.Option([], "--dataset", help="name=..,path=..,kind=..,domain=..,classnames=..,class_field=..,templates=..; repeatable."),
    retrieval: List[str] = typer.Option([], "--retrieval", help="Held-out shards for retrieval (or name=..,shards=..,caption_field=..)."),
    validation: List[str] = typer.Option([], "--validation", help="Per-domain validation loss: name=..,shards=..,domain=..[,caption_field=..]."),
    loss_batch_size: Optional[int] = typer.Option(None, "--loss-batch-size", help="Pairs per fixed validation-loss batch [default: 32, or the config's]."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Weight of the first-order similarity s1 in the combined score [default: 0.5, or the config's]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass [default: 64, or the config's]."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes [default: 0, or the config's]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps [default: auto, or the config's]."),
    label: Optional[str] = typer.Option(None, "--label", help="Row label in the table, a plain name [default: the run's name]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output dir; results kept per checkpoint step in step_NNNNNNNN/ [default: the run dir's eval/, else eval/LABEL]."),
) -> None:
    """Zero-shot top-1 (top-5 with more than 5 classes), per-class accuracy, confusion PNGs and retrieval R@K;
    writes results.json and a paper-style results.md per checkpoint step."""
    from pydantic import ValidationError

    from dalip.config import load_yaml_mapping
    from dalip.evaluate import DatasetSpec, EvalConfig, RetrievalSpec, evaluate, parse_spec, write_results
    from dalip.validation import ValidationSpec

    _setup_logging()
    values = load_yaml_mapping(config, "eval config") if config is not None else {}
    values.update({k: v for k, v in {"alpha": alpha, "batch_size": batch_size, "workers": workers, "device": device, "loss_batch_size": loss_batch_size}.items() if v is not None})
    try:
        cfg = EvalConfig(**values)
    except ValidationError as e:
        first = e.errors()[0]
        raise DalipError(f"{config or 'eval options'}: {'.'.join(map(str, first['loc']))}: {first['msg'].removeprefix('Value error, ')}") from None
    if label is not None:
        plain_name(label, "--label")
    if out is not None:
        check_output_dir(out)  # before the model is loaded and every image embedded
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
    test: Optional[str] = typer.Option(None, "--test", help="Explicit test split (same syntax) [default: a seeded split of --dataset]."),
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
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: new, empty, or an earlier export (replaced as a whole)."),
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
    return first_line(DalipError(msg)) if msg else type(err).__name__


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
