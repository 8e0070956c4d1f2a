"""``oialr stability DIR``: plots and a summary of the basis-stability series a run recorded."""
from __future__ import annotations

import json
import math
import os

from .. import OIALRConfig, PlateauRule, files
from .settings import ConfigError
from .plots import save_figure


def load_series(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "stability.jsonl")
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist: train with --set stability_every=N to record basis stability")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: list[dict], total_steps: int | None, rule: PlateauRule | None = None) -> dict:
    """Final network stability, when the series first reached 90% of it and when it first climbed 90% of the way from
    its lowest value to the final one (each as a step and a fraction of training; stability sampled close together
    is near 1 throughout, which makes the first trivially early), and where ``rule`` (default:
    :class:`oialr.PlateauRule`'s defaults) fed this series would have switched to low rank (``auto_switch_step``,
    None if never).

    With the QR mixing recorded (``oialr train`` records it), ``final_network_mixing`` is the last sample's mean over
    layers of ``‖R − R_prev‖_F / ‖R_prev‖_F`` (``W = QR``): how much the mixing of the basis still changes while the
    basis itself has settled (the paper's "bases first, mixing after"; drawn beside the stability).

    Measured on the samples that have a stability (the first ``lag`` samples have none)."""
    points = [(r["step"], r["network_stability"]) for r in records if r["network_stability"] is not None]
    if not points:
        return {"samples": len(records)}
    rule = rule or PlateauRule()
    for r in records:
        if rule.update(r["step"], r["network_stability"]):
            break
    final = points[-1][1]
    reached = next((step for step, value in points if value >= 0.9 * final), None)
    lowest = min(range(len(points)), key=lambda i: points[i][1])
    target = points[lowest][1] + 0.9 * (final - points[lowest][1])
    risen = next((step for step, value in points[lowest:] if value >= target), None)
    weighted = [r["weighted_stability"] for r in records if r["weighted_stability"] is not None]
    mixing = [m for m in map(network_mixing, records) if m is not None]
    return {
        "samples": len(records),
        "final_network_stability": final,
        "final_weighted_stability": weighted[-1] if weighted else None,
        "min_network_stability": points[lowest][1],
        "step_90pct_of_final": reached,
        "fraction_90pct_of_final": None if reached is None or not total_steps else reached / total_steps,
        "step_90pct_of_rise": risen,
        "fraction_90pct_of_rise": None if risen is None or not total_steps else risen / total_steps,
        "final_network_mixing": mixing[-1] if mixing else None,
        "auto_rule": rule.settings(),
        "auto_switch_step": rule.fired_step,
        "auto_reason": rule.reason or None,
    }


def network_mixing(record: dict) -> float | None:
    """Mean QR mixing ``‖R − R_prev‖_F / ‖R_prev‖_F`` over a record's layers that have one (None if none has)."""
    values = [layer["mixing"] for layer in record.get("layers", {}).values() if layer.get("mixing") is not None]
    return sum(values) / len(values) if values else None


def report(run_dir: str) -> dict:
    """Write ``stability_network.png`` (with the mixing beside the stability when recorded),
    ``stability_layers.png``, ``spectra.png`` (if ``spectra.json`` exists) and
    ``stability_summary.json`` to ``run_dir``; return the summary. The automatic-transition rule replayed on the
    series is the run's own (its ``oialr.auto`` settings), so a full-rank run shows where ``warmup_steps="auto"``
    would have switched: a cheap way to tune the rule (the controller samples at ``oialr.auto.lag``, every
    ``oialr.auto.every`` steps)."""
    records = load_series(run_dir)
    total_steps, rule = None, None
    results_path = os.path.join(run_dir, "results.json")
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
        total_steps = results.get("steps")
        rule = PlateauRule.from_settings(OIALRConfig.from_dict(results["config"]["oialr"]).auto)
    summary = summarize(records, total_steps, rule)
    files.write_json(os.path.join(run_dir, "stability_summary.json"), summary)
    try:
        _plot(records, run_dir, total_steps)
    except ImportError as err:
        summary["plots"] = f"skipped ({err}); pip install matplotlib"
    return summary


def _plot(records: list[dict], run_dir: str, total_steps: int | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    lag = f", bases {records[-1]['lag_steps']} steps apart" if "lag_steps" in records[-1] else ""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(steps, [_nan(r["network_stability"]) for r in records], label="mean over layers")
    ax.plot(steps, [_nan(r["weighted_stability"]) for r in records], label="parameter-weighted mean")
    ax.set(xlabel="optimizer step", ylabel="stability  tr(Q₁ᵀQ₂)/n", title=f"network basis stability{lag}")
    if total_steps:
        ax.set_xlim(0, total_steps)
    ax.grid(alpha=0.3)
    lines = ax.get_lines()
    mixing = [network_mixing(r) for r in records]
    if any(m is not None for m in mixing):
        twin = ax.twinx()
        lines += twin.plot(steps, [_nan(m) for m in mixing], color="tab:red", lw=0.8,
                           label="QR mixing ‖R − R_prev‖/‖R_prev‖ (right)")
        twin.set(ylabel="mixing change (mean over layers)", yscale="log")
    ax.legend(handles=lines, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(lines))
    save_figure(fig, os.path.join(run_dir, "stability_network.png"))

    names = list(records[-1]["layers"])
    grid = [[_nan(r["layers"].get(name, {}).get("stability")) for r in records] for name in names]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(names) + 1.5))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(steps[0], steps[-1], len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set(xlabel="optimizer step", title=f"basis stability per layer{lag}")
    fig.colorbar(image, ax=ax)
    save_figure(fig, os.path.join(run_dir, "stability_layers.png"))

    spectra_path = os.path.join(run_dir, "spectra.json")
    if os.path.exists(spectra_path):
        with open(spectra_path) as f:
            spectra = json.load(f)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for name, s in spectra.items():
            if s and s[0] > 0:
                ax.plot([i / max(len(s) - 1, 1) for i in range(len(s))], [v / s[0] for v in s], lw=0.8, label=name)
        ax.set(xlabel="index / (n - 1)", ylabel="σ_i / σ_max", yscale="log", title="singular values at the end")
        ax.grid(alpha=0.3)
        if len(spectra) <= 12:
            ax.legend(fontsize=6)
        save_figure(fig, os.path.join(run_dir, "spectra.png"))


def _nan(value: float | None) -> float:
    return math.nan if value is None else value

