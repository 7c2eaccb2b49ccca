"""Mixing laws: fit recovery, leave-one-out error, suggestions, step law, and the CLI's errors."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest

from plantmix.cli import main
from plantmix.core.errors import PlantmixError
from plantmix.mixlaw import Law, PoolLimit, fit_law, suggest_critical, suggest_weighted
from plantmix.mixlaw.points import average_seeds, check_points
from plantmix.mixlaw.steplaw import predict_at_step

TRUE = {"plant": (2.0, 1.5, -2.5), "general": (1.8, 0.2, 2.0)}
RATIOS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]


def synthetic(noise: float = 0.0, seeds: int = 1, ratios=RATIOS, rng_seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(rng_seed)
    rows = []
    for domain, (c, k, t) in TRUE.items():
        for seed in range(seeds):
            for r in ratios:
                loss = (c + k * math.exp(t * r)) * (1 + noise * rng.standard_normal())
                rows.append({"ratio": r, "domain": domain, "loss": loss, "seed": seed})
    return pd.DataFrame(rows)


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["plantmix", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def one_error_line(code, err, needle):
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err


@pytest.fixture(scope="module")
def clean_law():
    return fit_law(average_seeds(check_points(synthetic())))


def test_noise_free_fit_recovers_parameters(clean_law):
    for domain, (c, k, t) in TRUE.items():
        fit = clean_law.domains[domain]
        for got, want in ((fit.c, c), (fit.k, k), (fit.t, t)):
            assert abs(got - want) <= 1e-3 * abs(want), (domain, fit)
        assert set(fit.candidates) == {"two_stage", "joint"}
        assert fit.loo_mean_abs_rel_error < 1e-6


def test_two_stage_alone_is_close_on_clean_points():
    from plantmix.mixlaw.fit import fit_two_stage

    r = np.array(RATIOS)
    for c, k, t in TRUE.values():
        law = fit_two_stage(r, c + k * np.exp(t * r))
        assert np.max(np.abs(law(r) / (c + k * np.exp(t * r)) - 1)) < 1e-3


def test_noisy_fit_reports_leave_one_out_below_two_percent():
    law = fit_law(average_seeds(check_points(synthetic(noise=0.01, seeds=2))))
    for fit in law.domains.values():
        assert fit.loo_mean_abs_rel_error is not None and fit.loo_mean_abs_rel_error < 0.02
        assert all(p["seeds"] == 2 and p["loss_std"] > 0 for p in fit.points)  # spread over seeds is reported
        assert all(p["loo_predicted"] is not None for p in fit.points)


def test_weighted_suggestion_is_the_minimum(clean_law):
    s = suggest_weighted(clean_law, {"plant": 0.5, "general": 0.5})
    grid = np.linspace(0, 1, 100_001)
    total = 0.5 * Law(*TRUE["plant"])(grid) + 0.5 * Law(*TRUE["general"])(grid)
    assert abs(s.ratio - grid[np.argmin(total)]) < 1e-4
    assert set(s.predicted) == {"plant", "general"} and not s.bounded_by_pool


def test_critical_proportion_closed_form_and_pool_bound(clean_law):
    s = suggest_critical(clean_law, tolerance=0.05, reference_ratio=0.0)
    g = Law(*TRUE["general"])
    assert abs(g(s.ratio) - 1.05 * g(0.0)) < 1e-6  # the general loss sits exactly on the bound
    bounded = suggest_critical(clean_law, 0.05, reference_ratio=0.0, pool=PoolLimit(10, 1000, 15.0))
    assert bounded.ratio == pytest.approx(0.15) and bounded.bounded_by_pool
    with pytest.raises(PlantmixError, match="no plant share"):
        suggest_critical(clean_law, 0.0, reference_loss=1.0)


def test_step_law_predicts_the_target_step():
    rows = []
    for r in (0.1, 0.5, 0.9):
        c, s0 = 2.0 + r, 50.0 * (1 + r)
        rows += [{"domain": "plant", "ratio": r, "step": s, "loss": c + (s0 / s) ** 0.7, "seed": 0} for s in (100, 200, 400, 800)]
    pred, info = predict_at_step(average_seeds(check_points(pd.DataFrame(rows))), 5000)
    assert info["domains"]["plant"]["alpha"] == pytest.approx(0.7, rel=1e-3)
    for _, row in pred.iterrows():
        want = 2.0 + row.ratio + (50.0 * (1 + row.ratio) / 5000) ** 0.7
        assert row.loss == pytest.approx(want, rel=1e-4)


def test_cli_fit_and_suggest_write_json_and_png(tmp_path, capsys, monkeypatch):
    points = tmp_path / "points.parquet"
    synthetic(noise=0.005, seeds=2, ratios=[0.1, 0.3, 0.5, 0.7, 0.9]).to_parquet(points)
    code, _, err = run_cli(["mixlaw", "fit", points, "--out", tmp_path / "law"], capsys, monkeypatch)
    assert code == 0, err
    data = json.loads((tmp_path / "law" / "mixlaw.json").read_text())
    for fit in data["domains"].values():
        assert {"c", "k", "t", "loo_mean_abs_rel_error", "residual_rmse", "points"} <= set(fit)
    assert (tmp_path / "law" / "mixlaw.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_cli(["mixlaw", "suggest", tmp_path / "law", "--weights", "plant=0.5,general=0.5"], capsys, monkeypatch)
    assert code == 0, err
    saved = json.loads((tmp_path / "law" / "suggest.json").read_text())
    assert f"r* = {saved['ratio']:.4f}" in out and set(saved["predicted"]) == {"plant", "general"}
    code, out, err = run_cli(["mixlaw", "suggest", tmp_path / "law", "--general-tolerance", "0.02", "--reference-ratio", "0"], capsys, monkeypatch)
    assert code == 0 and json.loads((tmp_path / "law" / "suggest.json").read_text())["objective"] == "critical_proportion"


@pytest.mark.parametrize(
    "frame, needle",
    [
        (synthetic(ratios=[0.2, 0.8]), "has 2 distinct ratio(s)"),
        (synthetic().assign(ratio=lambda f: f.ratio * 1.5), "outside [0, 1]"),
        (synthetic().drop(columns=["loss"]), "missing column(s) ['loss']"),
        (pd.concat([synthetic(), synthetic(ratios=[0.1, 0.9]).assign(domain="fungi")]), "domain 'fungi' has 2 distinct"),
    ],
    ids=["two-ratio grid", "ratio outside", "no loss column", "domain with 2 ratios"],
)
def test_cli_fit_errors_are_one_line(frame, needle, tmp_path, capsys, monkeypatch):
    points = tmp_path / "points.csv"
    frame.to_csv(points, index=False)
    code, _, err = run_cli(["mixlaw", "fit", points, "--out", tmp_path / "law"], capsys, monkeypatch)
    one_error_line(code, err, needle)


def test_cli_suggest_errors_are_one_line(clean_law, tmp_path, capsys, monkeypatch):
    clean_law.write(tmp_path / "mixlaw.json")
    code, _, err = run_cli(["mixlaw", "suggest", tmp_path], capsys, monkeypatch)
    one_error_line(code, err, "give exactly one objective")
    code, _, err = run_cli(["mixlaw", "suggest", tmp_path, "--weights", "plant=x"], capsys, monkeypatch)
    one_error_line(code, err, "--weights expects DOMAIN=W")
    code, _, err = run_cli(["mixlaw", "suggest", tmp_path / "nope"], capsys, monkeypatch)
    one_error_line(code, err, "not found")
