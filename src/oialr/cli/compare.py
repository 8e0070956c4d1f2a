"""``oialr compare``: a markdown table of runs side by side, from their ``results.json``."""
from __future__ import annotations

import json
import os
import statistics

from .config import ConfigError


def load_results(run_dir: str) -> dict:
    path = os.path.join(run_dir, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: is {run_dir} a finished run?") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None


def compare_table(run_dirs: list[str]) -> str:
    """One row per run: top-1, best top-1, trainable and stored parameters (% of dense), time, peak memory."""
    header = ("run", "method", "model", "top1", "best top1", "trainable %", "stored %", "switched at step",
              "train s", "peak MB")
    rows = []
    for run_dir in run_dirs:
        r = load_results(run_dir)
        dense = r["dense_params"]
        rows.append((os.path.basename(os.path.normpath(run_dir)), r["method"], r["model"], f"{r['top1']:.4f}",
                     f"{r['best_top1']:.4f}", f"{100 * r['trainable_params'] / dense:.1f}",
                     f"{100 * r['stored_params'] / dense:.1f}",
                     "—" if r.get("transition_step") is None else str(r["transition_step"]),
                     f"{r['train_seconds']:.1f}",
                     f"{r['peak_rss_mb']:.0f}"))
    return _markdown(header, rows)


def aggregate_table(groups: dict[str, list[str]]) -> str:
    """One row per group of runs (e.g. seeds): mean ± std of top-1, trainable %, stored %, time, peak memory (the
    value alone for a group of one run)."""
    header = ("runs", "n", "top1", "trainable %", "stored %", "train s", "peak MB")
    rows = []
    for name, run_dirs in groups.items():
        results = [load_results(d) for d in run_dirs]

        def stat(values: list[float], fmt: str) -> str:
            if len(values) == 1:
                return f"{values[0]:{fmt}}"
            return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"

        rows.append((name, str(len(results)),
                     stat([100 * r["top1"] for r in results], ".2f"),
                     stat([100 * r["trainable_params"] / r["dense_params"] for r in results], ".1f"),
                     stat([100 * r["stored_params"] / r["dense_params"] for r in results], ".1f"),
                     stat([r["train_seconds"] for r in results], ".0f"),
                     stat([r["peak_rss_mb"] for r in results], ".0f")))
    return _markdown(header, rows)


def _markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
