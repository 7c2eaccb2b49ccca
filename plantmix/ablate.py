"""Mixing-law ablations (DESIGN §5): grid → mixes → proxy `dalip` runs → per-domain eval → fit →
suggest → one confirmation run at r*, into BUILD/ablations/<name>/.

The one module that drives both packages: plantmix for the mixes, dalip (through its Python API) for
training and evaluation. Resumable at every level: mixes are plantmix stages, proxy runs resume from
their latest checkpoint (`resume: latest`), an evaluation is written atomically once and reused, so a
killed ablation reruns only what is missing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console

from plantmix.core.errors import PlantmixError
from plantmix.core.stage import atomic_path, atomic_write_text, fingerprint

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
POINT_FIELDS = ("ratio", "seed", "step", "domain", "metric", "loss", "run")
LOSS_METRICS = ("first", "second", "combined")
_RESERVED_MIX_KEYS = {"name", "ratio", "total", "plant", "general", "seed"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ProxyTrainConfig(_Strict):
    """The proxy runs: a `dalip train` config plus overrides; identical for every ratio and seed."""

    config: str = Field(..., description="dalip train YAML (train_data, name, runs_dir and seed are set per run)")
    steps: int = Field(..., ge=1)
    overrides: dict[str, Any] = Field(default_factory=dict, description="TrainConfig keys, e.g. batch_size, lr")
    eval_every: int | None = Field(None, ge=1, description="evaluate every N steps too (for the nested step law)")

    @model_validator(mode="after")
    def _check(self) -> "ProxyTrainConfig":
        clash = sorted({"train_data", "name", "runs_dir", "seed", "steps", "resume"} & set(self.overrides))
        if clash:
            raise ValueError(f"overrides may not set {clash}: the ablation sets them per run")
        if self.eval_every is not None and self.steps % self.eval_every:
            raise ValueError(f"steps {self.steps} is not a multiple of eval_every {self.eval_every}")
        return self


class ProxyEvalConfig(_Strict):
    config: str = Field(..., description="dalip eval YAML with one `validation` set per domain")
    metric: Literal["first", "second", "combined"] = "combined"


class SuggestConfig(_Strict):
    """Give `weights` or `general_tolerance` (with reference_ratio or reference_loss)."""

    weights: dict[str, float] | None = None
    general_tolerance: float | None = Field(None, ge=0)
    reference_ratio: float | None = Field(None, ge=0, le=1)
    reference_loss: float | None = Field(None, gt=0)
    target_total: int | None = Field(None, ge=1, description="samples of the target mix [the grid total]")
    max_epochs: float = Field(15.0, gt=0, description="most passes over the plant pool at the target size")

    @model_validator(mode="after")
    def _one_objective(self) -> "SuggestConfig":
        if (self.weights is None) == (self.general_tolerance is None):
            raise ValueError("give exactly one of weights or general_tolerance")
        if self.general_tolerance is not None and (self.reference_ratio is None) == (self.reference_loss is None):
            raise ValueError("general_tolerance needs exactly one of reference_ratio or reference_loss")
        return self


class AblationConfig(_Strict):
    name: str = Field(pattern=_NAME)
    build: str | None = Field(None, description="build directory [builds/<recipe name>]")
    recipe: str | None = Field(None, description="recipe that builds `build` when it has no manifest yet")
    ratios: list[float] = Field(..., min_length=3)
    total: int = Field(..., ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    mix: dict[str, Any] = Field(default_factory=dict, description="MixSpec options (shard_size, caps, ...)")
    max_epochs: float | None = Field(None, gt=0, description="grid guard with allow_repeat [15]")
    train: ProxyTrainConfig
    eval: ProxyEvalConfig
    suggest: SuggestConfig
    target_step: int | None = Field(None, ge=1, description="fit a step law and the mixing law at this step")
    confirm: bool = True
    throughput: float | None = Field(None, gt=0, description="samples/s per accelerator, for the dry-run estimate")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads for proxy runs and evals [torch's default]")

    @model_validator(mode="after")
    def _check(self) -> "AblationConfig":
        bad = [r for r in self.ratios if not 0 <= r <= 1]
        if bad:
            raise ValueError(f"ratio {bad[0]:g} is outside [0, 1]")
        if len(set(self.ratios)) != len(self.ratios) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("ratios and seeds must be distinct")
        clash = sorted(_RESERVED_MIX_KEYS & set(self.mix))
        if clash:
            raise ValueError(f"mix may not set {clash}: the grid sets them")
        if self.target_step is not None and self.train.eval_every is None:
            raise ValueError("target_step (the nested step law) needs train.eval_every")
        return self


class AblationFile(_Strict):
    """A file holding only an ablation (it names the build, and the recipe that makes it)."""

    ablation: AblationConfig


def load_ablation(path: Path) -> tuple[AblationConfig, Any]:
    """(ablation, recipe or None) from a recipe with an `ablation:` section or an ablation-only file."""
    from plantmix.core.recipe import load_recipe, load_yaml

    path = Path(path)
    if not path.is_file():
        raise PlantmixError(f"{path}: file not found")
    data = load_yaml(path, "ablation") or {}
    if isinstance(data, dict) and "sources" in data:
        recipe = load_recipe(path)
        if recipe.ablation is None:
            raise PlantmixError(f"{path}: the recipe has no `ablation:` section")
        return recipe.ablation, recipe
    from pydantic import ValidationError

    from plantmix.core.recipe import _format_error

    try:
        ablation = AblationFile.model_validate(data).ablation
    except ValidationError as e:
        raise PlantmixError(_format_error(path, e)) from None
    return ablation, (load_recipe(ablation.recipe) if ablation.recipe else None)


# ---- runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyRun:
    ratio: float
    seed: int
    mix_dir: Path
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def train_config(cfg: AblationConfig, run: ProxyRun):
    """The dalip TrainConfig of one proxy run."""
    from dalip.config import load_train_config

    overrides = {**cfg.train.overrides, "train_data": str(run.mix_dir / "shards"), "name": run.name,
                 "runs_dir": str(run.run_dir.parent), "seed": run.seed, "steps": cfg.train.steps, "resume": "latest"}  # fmt: skip
    if cfg.train.eval_every:
        overrides["save_every"] = cfg.train.eval_every
        overrides["keep_checkpoints"] = cfg.train.steps // cfg.train.eval_every + 1
    return load_train_config(cfg.train.config, overrides)


def eval_steps(cfg: AblationConfig) -> list[int]:
    every = cfg.train.eval_every or cfg.train.steps
    return list(range(every, cfg.train.steps + 1, every))


def load_eval_config(cfg: AblationConfig):
    from dalip.config import load_yaml_mapping
    from dalip.evaluate import EvalConfig

    path = Path(cfg.eval.config)
    if not path.is_file():
        raise PlantmixError(f"eval config not found: {path}")
    eval_cfg = EvalConfig(**load_yaml_mapping(path, "eval config"))
    domains = sorted(v.domain for v in eval_cfg.validation)
    if domains != ["general", "plant"]:
        raise PlantmixError(f"{path}: needs exactly one `validation` set per domain (plant, general); has {domains or 'none'}")
    return eval_cfg


def evaluate_run(run_dir: Path, step: int, eval_cfg) -> dict[str, Any]:
    """results.json of one checkpoint, computed once (written atomically) and reused afterwards."""
    from dalip.evaluate import evaluate, write_results

    out = run_dir / "eval" / f"step_{step:08d}"
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    results = evaluate(run_dir / "checkpoints" / f"step_{step:08d}", eval_cfg, label=run_dir.name)
    with atomic_path(out) as tmp:
        write_results(results, tmp)
    return json.loads((out / "results.json").read_text())


def train_and_evaluate(cfg: AblationConfig, run: ProxyRun, eval_cfg, console: Console) -> list[dict[str, Any]]:
    """Train (or resume, or skip when finished) one proxy run; its results per evaluated step."""
    from dalip.checkpoint import list_checkpoints, load_meta
    from dalip.train import train

    started = time.monotonic()
    checkpoints = list_checkpoints(run.run_dir)
    finished = bool(checkpoints) and int(load_meta(checkpoints[-1])["step"]) >= cfg.train.steps
    if not finished:  # a finished run is left untouched; an unfinished one resumes from its latest checkpoint
        train(train_config(cfg, run))
    results = [evaluate_run(run.run_dir, step, eval_cfg) for step in eval_steps(cfg)]
    verb = "done earlier" if finished else "trained"
    console.print(f"  {run.name}: {verb}, evaluated ({time.monotonic() - started:.0f} s)", highlight=False)
    return results


def points_rows(run: ProxyRun, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        for v in res["validation"].values():
            for metric in LOSS_METRICS:
                rows.append({"ratio": run.ratio, "seed": run.seed, "step": res["step"], "domain": v["domain"],
                             "metric": metric, "loss": float(v[metric]), "run": run.name})  # fmt: skip
    return rows


def accuracy_row(run: ProxyRun, results: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot top-1 per domain (combined score) of a run's final checkpoint, when the eval has datasets."""
    means = (results.get("means") or {}).get("combined") or {}
    return {"run": run.name, "ratio": run.ratio, "seed": run.seed, "plant": means.get("plant"), "general": means.get("general")}


def write_points(rows: list[dict[str, Any]], path: Path) -> Path:
    rows = sorted(rows, key=lambda r: (r["domain"], r["metric"], r["ratio"], r["seed"], r["step"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=POINT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return path


# ---- the ablation -----------------------------------------------------------------------------


def resolve_build_dir(cfg: AblationConfig, recipe=None, given: Path | None = None) -> Path:
    """--build, else ablation.build, else builds/<recipe name>."""
    if given is not None:
        return Path(given)
    if cfg.build is not None:
        return Path(cfg.build)
    if recipe is None:
        raise PlantmixError("no build directory: set ablation.build or pass --build")
    return Path("builds") / recipe.name


def ablation_dir(build_dir: Path, cfg: AblationConfig) -> Path:
    return Path(build_dir) / "ablations" / cfg.name


def _claim(out: Path, cfg: AblationConfig) -> None:
    """An ablation directory belongs to one configuration: a changed config must not mix old runs in."""
    key = fingerprint(cfg.model_dump(mode="json"))
    marker = out / "ablation.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("key") != key:
            raise PlantmixError(f"{out}: holds an ablation with other settings; give this one another name or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"key": key, "config": cfg.model_dump(mode="json")}, indent=1) + "\n")


def _ensure_build(cfg: AblationConfig, build_dir: Path, recipe, console: Console) -> None:
    if (build_dir / "manifest.parquet").is_file():
        return
    if recipe is None:
        raise PlantmixError(f"{build_dir}: no manifest.parquet; run `plantmix build` first or set ablation.recipe")
    from plantmix.build import run_build

    console.print(f"building {build_dir} from recipe {recipe.name}", highlight=False)
    run_build(recipe, build_dir)


def run_ablation(cfg: AblationConfig, build_dir: Path, recipe=None, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) the whole ablation; returns the summary written to report.md."""
    from plantmix.mix.grid import available_rows, run_grid
    from plantmix.mix.spec import make_spec
    from plantmix.mixlaw.run import fit_points_file
    from plantmix.mixlaw.suggest import PoolLimit

    console = console or Console(stderr=True)
    build_dir = Path(build_dir)
    _ensure_build(cfg, build_dir, recipe, console)
    out = ablation_dir(build_dir, cfg)
    _claim(out, cfg)
    eval_cfg = load_eval_config(cfg)
    started = time.monotonic()
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)  # on a busy small CPU one thread per run beats contended OpenMP

    runs: list[ProxyRun] = []
    for seed in cfg.seeds:
        mixes = run_grid(build_dir, cfg.ratios, cfg.total, name_prefix=cfg.name, max_epochs=cfg.max_epochs, seed=seed, **cfg.mix)
        runs += [ProxyRun(r, seed, m, out / "runs" / f"r{r:g}-s{seed}") for r, m in zip(cfg.ratios, mixes)]
    console.print(f"{len(runs)} proxy runs ({len(cfg.ratios)} ratios × {len(cfg.seeds)} seeds) → {out / 'runs'}", highlight=False)
    rows, accuracy = [], []
    for i, run in enumerate(runs, 1):
        console.print(f"[{i}/{len(runs)}] ratio {run.ratio:g}, seed {run.seed}", highlight=False, markup=False)
        results = train_and_evaluate(cfg, run, eval_cfg, console)
        rows += points_rows(run, results)
        accuracy.append(accuracy_row(run, results[-1]))
    points = write_points(rows, out / "points.csv")

    spec0 = make_spec(ratio=cfg.ratios[0], total=cfg.total, seed=cfg.seeds[0], **cfg.mix)
    pool = PoolLimit(available_rows(build_dir, spec0)["plant"], cfg.suggest.target_total or cfg.total, cfg.suggest.max_epochs)
    law = fit_points_file(points, out, metric=cfg.eval.metric, target_step=cfg.target_step, pool=pool)
    suggestion = _suggest(cfg, law, pool)
    suggestion.write(out / "suggest.json")
    console.print(f"r* = {suggestion.ratio:.4f} ({suggestion.objective})", highlight=False)

    confirmation = _confirm(cfg, build_dir, out, suggestion, eval_cfg, console) if cfg.confirm else None
    from plantmix.mixlaw.plot import plot_law

    observed = confirmation["observed"] if confirmation else None
    plot_law(law, out / "mixlaw.png", suggestion.ratio, observed)
    summary = {"name": cfg.name, "runs": len(runs), "points": str(points), "law": law.to_dict(),
               "suggestion": asdict(suggestion), "confirmation": confirmation,
               "seconds_this_invocation": time.monotonic() - started, "report": str(out / "report.md")}  # fmt: skip
    atomic_write_text(out / "report.md", report_markdown(cfg, summary, rows, accuracy))
    return summary


def _suggest(cfg: AblationConfig, law, pool):
    from plantmix.mixlaw.suggest import suggest_critical, suggest_weighted

    s = cfg.suggest
    if s.weights is not None:
        return suggest_weighted(law, s.weights, pool)
    return suggest_critical(law, s.general_tolerance, s.reference_ratio, s.reference_loss, pool)


def _confirm(cfg: AblationConfig, build_dir: Path, out: Path, suggestion, eval_cfg, console: Console) -> dict[str, Any]:
    """One run at r* (first seed; r* rounded to 4 decimals for the mix name): observed vs predicted."""
    from plantmix.mix.grid import run_grid

    ratio = round(suggestion.ratio, 4)
    seed = cfg.seeds[0]
    (mix_dir,) = run_grid(build_dir, [ratio], cfg.total, name_prefix=f"{cfg.name}-confirm", max_epochs=cfg.max_epochs, seed=seed, **cfg.mix)
    run = ProxyRun(ratio, seed, mix_dir, out / "confirm" / f"r{ratio:g}-s{seed}")
    console.print(f"[confirm] ratio {ratio:g}, seed {seed}", highlight=False, markup=False)
    final = train_and_evaluate(cfg, run, eval_cfg, console)[-1]
    from plantmix.mixlaw.fit import MixingLaw

    law = MixingLaw.read(out / "mixlaw.json")
    observed = {v["domain"]: float(v[cfg.eval.metric]) for v in final["validation"].values()}
    predicted = {d: float(law.domains[d].law(ratio)) for d in observed}
    return {"ratio": ratio, "seed": seed, "run": str(run.run_dir), "observed": observed, "predicted": predicted,
            "abs_rel_error": {d: abs(predicted[d] - observed[d]) / observed[d] for d in observed}}  # fmt: skip


# ---- plan -------------------------------------------------------------------------------------


def ablation_plan(cfg: AblationConfig) -> dict[str, Any]:
    """Runs, samples seen and estimated accelerator-hours, from the configs alone (nothing is read
    but the recipe and, when the overrides do not state batch_size and model, the train config)."""
    train = dict(cfg.train.overrides)
    if not {"batch_size", "model"} <= set(train) and Path(cfg.train.config).is_file():
        from dalip.config import load_train_config

        loaded = load_train_config(cfg.train.config, {**train, "train_data": "(per ratio)", "steps": cfg.train.steps})
        train = {"batch_size": loaded.batch_size, "model": loaded.model, **train}
    batch = train.get("batch_size")
    samples = cfg.train.steps * batch if batch else None
    proxy = len(cfg.ratios) * len(cfg.seeds)
    runs = proxy + int(cfg.confirm)
    hours = samples / cfg.throughput / 3600 if cfg.throughput and samples else None
    return {"name": cfg.name, "ratios": cfg.ratios, "seeds": cfg.seeds, "total": cfg.total, "proxy_runs": proxy,
            "confirmation_runs": int(cfg.confirm), "runs": runs, "steps": cfg.train.steps, "batch_size": batch,
            "model": train.get("model"), "samples_per_run": samples, "epochs_per_run": samples / cfg.total if samples else None,
            "evaluations_per_run": len(eval_steps(cfg)), "throughput": cfg.throughput, "hours_per_run": hours,
            "hours_total": None if hours is None else hours * runs}  # fmt: skip


# ---- report -----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def report_markdown(cfg: AblationConfig, summary: dict[str, Any], rows: list[dict[str, Any]], accuracy: list[dict[str, Any]]) -> str:
    law = summary["law"]
    lines = [f"# Mixing-law ablation `{cfg.name}`", "",
             f"{summary['runs']} proxy runs: ratios {', '.join(f'{r:g}' for r in cfg.ratios)} × seeds "
             f"{', '.join(map(str, cfg.seeds))}, {cfg.total} samples per mix, {cfg.train.steps} steps "
             f"(`{cfg.train.config}`), validation loss `{cfg.eval.metric}` (`{cfg.eval.config}`).", "",
             "## Fitted law: " + law["form"], "",
             "| domain | c | k | t | fit | leave-one-out mean abs rel error | residual RMSE |", "|---|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for d, f in law["domains"].items():
        loo = "–" if f["loo_mean_abs_rel_error"] is None else f"{100 * f['loo_mean_abs_rel_error']:.2f} %"
        lines.append(f"| {d} | {f['c']:.4f} | {f['k']:.4f} | {f['t']:.4f} | {f['method']} | {loo} | {f['residual_rmse']:.4f} |")
    lines += ["", "## Points (seed mean ± std) and predictions", "",
              "| domain | ratio | loss | ± std | seeds | fitted | leave-one-out |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for d, f in law["domains"].items():
        for p in f["points"]:
            loo = "–" if p["loo_predicted"] is None else f"{p['loo_predicted']:.4f}"
            lines.append(f"| {d} | {p['ratio']:g} | {p['loss']:.4f} | {p['loss_std']:.4f} | {p['seeds']} | {p['predicted']:.4f} | {loo} |")
    s = summary["suggestion"]
    bound = " (bounded by the plant pool)" if s["bounded_by_pool"] else ""
    lines += ["", f"## Suggestion: r* = {s['ratio']:.4f}{bound}", "", f"Objective: {s['objective']} {json.dumps(s['details'])}; "
              f"upper bound from the plant pool {s['upper_bound']:.4f}.", ""]  # fmt: skip
    c = summary["confirmation"]
    if c:
        lines += [f"## Confirmation run at r = {c['ratio']:g} (seed {c['seed']})", "",
                  "| domain | predicted | observed | abs rel error |", "|---|---:|---:|---:|"]  # fmt: skip
        for d in sorted(c["observed"]):
            lines.append(f"| {d} | {c['predicted'][d]:.4f} | {c['observed'][d]:.4f} | {100 * c['abs_rel_error'][d]:.2f} % |")
        lines.append("")
    if any(a["plant"] is not None or a["general"] is not None for a in accuracy):
        lines += ["## Zero-shot top-1 (%, combined score) per run", "", "| run | ratio | seed | plant | general |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {a['run']} | {a['ratio']:g} | {a['seed']} | {_pct(a['plant'])} | {_pct(a['general'])} |" for a in accuracy]
        lines.append("")
    lines += ["![mixing law](mixlaw.png)", "",
              f"Files: `points.csv` ({len(rows)} rows), `mixlaw.json`, `suggest.json`, `runs/*/eval/*/results.json`.", ""]
    return "\n".join(lines)
