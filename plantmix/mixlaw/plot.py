"""PNG of a mixing law: per domain the points (seed mean ± std), the fitted curve, the
leave-one-ratio-out predictions and, when given, r* with its predicted and observed losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plantmix.mixlaw.fit import MixingLaw


def plot_law(
    law: MixingLaw,
    out: Path,
    suggested_ratio: float | None = None,
    observed: dict[str, float] | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(law.domains)
    fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 4.0), squeeze=False)
    grid = np.linspace(0.0, 1.0, 201)
    for ax, name in zip(axes[0], domains):
        fit = law.domains[name]
        r = np.array([p["ratio"] for p in fit.points])
        loss = np.array([p["loss"] for p in fit.points])
        std = np.array([p["loss_std"] for p in fit.points])
        ax.errorbar(r, loss, yerr=std, fmt="o", color="C0", capsize=3, label="observed (seed mean ± std)")
        ax.plot(grid, fit.law(grid), "-", color="C1",
                label=f"fit: {fit.c:.3g} + {fit.k:.3g}·exp({fit.t:.3g}·r)")  # fmt: skip
        loo = [(p["ratio"], p["loo_predicted"]) for p in fit.points if p["loo_predicted"] is not None]
        if loo:
            err = fit.loo_mean_abs_rel_error
            ax.plot(*zip(*loo), "x", color="C3", markersize=8, label=f"leave-one-out ({100 * err:.2f} % error)")
        if suggested_ratio is not None:
            ax.axvline(suggested_ratio, color="grey", ls="--", lw=1)
            ax.plot([suggested_ratio], [fit.law(suggested_ratio)], "D", color="C1", mfc="none", label=f"r* = {suggested_ratio:.3f} predicted")
            if observed and name in observed:
                ax.plot([suggested_ratio], [observed[name]], "D", color="C2", label="r* observed")
        ax.set_xlabel("plant share r")
        ax.set_ylabel(f"{name} validation loss" + (f" ({law.metric})" if law.metric else ""))
        ax.set_title(f"{name} ({fit.method.replace('_', '-')} fit)")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
