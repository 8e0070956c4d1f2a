"""``oialr compare``: a markdown table of runs side by side, from their ``results.json`` (or, by epoch, from their
``metrics.jsonl``)."""
from __future__ import annotations

import json
import os
import statistics

from .settings import ConfigError


def load_results(run_dir: str) -> dict:
    path = os.path.join(run_dir, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{path} does not exist: is {run_dir} a finished run?") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None


def _is_text(results: dict) -> bool:
    return results.get("val_bpb") is not None


def factored_stored_fraction(results: dict) -> float | None:
    """Parameters the factored layers store / the dense parameters of the weights they replace (``None`` when the
    run factored no layer: full-rank, GaLore, or OIALR still in warm-up)."""
    layers = list(results.get("layers", {}).values())
    if results.get("transition_step") is None or not layers:
        return None
    return sum(layer["stored_params"] for layer in layers) / sum(layer["dense_params"] for layer in layers)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def compare_table(run_dirs: list[str]) -> str:
    """One row per run: top-1, best top-1, trainable and stored parameters (% of dense), the factored layers' stored
    parameters (% of the weights they replace), time, peak memory; for
    text runs validation bits per byte and tokens per second of each phase instead of top-1
    (:func:`text_compare_table`)."""
    results = [load_results(d) for d in run_dirs]
    if any(_is_text(r) for r in results):
        return text_compare_table(run_dirs, results)
    header = ("run", "method", "model", "top1", "best top1", "trainable %", "stored %", "factored stored %",
              "switched at step", "train s", "peak MB")
    rows = []
    for run_dir, r in zip(run_dirs, results):
        dense = r["dense_params"]
        rows.append((os.path.basename(os.path.normpath(run_dir)), r["method"], r["model"], f"{r['top1']:.4f}",
                     f"{r['best_top1']:.4f}", f"{100 * r['trainable_params'] / dense:.1f}",
                     f"{100 * r['stored_params'] / dense:.1f}", _percent(factored_stored_fraction(r)),
                     "—" if r.get("transition_step") is None else str(r["transition_step"]),
                     f"{r['train_seconds']:.1f}",
                     f"{r['peak_rss_mb']:.0f}"))
    return _markdown(header, rows)


def text_compare_table(run_dirs: list[str], results: list[dict]) -> str:
    """One row per text run: val bits per byte (final, best), val loss, trainable and stored parameters (% of
    dense), the factored layers' stored parameters (% of the weights they replace), optimizer state (% of dense),
    switch step, tokens/s in the full-rank and low-rank phases, time, memory."""
    header = ("run", "method", "val bpb", "best val bpb", "val loss", "trainable %", "stored %", "factored stored %",
              "opt. state %",
              "switched at step", "tok/s full-rank", "tok/s low-rank", "train s", "peak MB")
    rows = []
    for run_dir, r in zip(run_dirs, results):
        dense = r["dense_params"]
        state = r.get("optimizer_state_params")
        rows.append((os.path.basename(os.path.normpath(run_dir)), r["method"],
                     *(f"{r[k]:.4f}" if r.get(k) is not None else "—" for k in ("val_bpb", "best_val_bpb", "val_loss")),
                     f"{100 * r['trainable_params'] / dense:.1f}", f"{100 * r['stored_params'] / dense:.1f}",
                     _percent(factored_stored_fraction(r)),
                     "—" if state is None else f"{100 * state / dense:.1f}",
                     "—" if r.get("transition_step") is None else str(r["transition_step"]),
                     _rate(r.get("tokens_per_second_full_rank")), _rate(r.get("tokens_per_second_low_rank")),
                     f"{r['train_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}"))
    return _markdown(header, rows)


def epoch_table(run_dirs: list[str], key: str = "test_top1") -> str:
    """One row per run, one column per epoch: ``key`` of ``metrics.jsonl`` (test top-1 in %, or the value)."""
    series = {}
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "metrics.jsonl")
        try:
            with open(path) as f:
                series[os.path.basename(os.path.normpath(run_dir))] = {row["epoch"]: row[key] for row in map(
                    json.loads, f)}
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: is {run_dir} a run folder?") from None
        except (json.JSONDecodeError, KeyError) as err:
            raise ConfigError(f"{path} is not a metrics file of oialr train ({err!r})") from None
    epochs = sorted({epoch for rows in series.values() for epoch in rows})
    scale = 100 if key.endswith("top1") else 1
    rows = [(name, *(f"{scale * rows[e]:.{1 if scale == 100 else 4}f}" if e in rows else "—" for e in epochs))
            for name, rows in series.items()]
    return _markdown((f"{key} by epoch", *map(str, epochs)), rows)


def aggregate_table(groups: dict[str, list[str]], reference: str | None = None) -> str:
    """One row per group of runs (e.g. seeds): mean ± std of top-1 (text: val bits per byte, and tokens/s per
    phase), trainable %, stored %, the factored layers' stored % of the weights they replace, time, peak memory
    (the value alone for a group of one run). With ``reference`` (one of the groups, e.g. full-rank), a column
    ``time ÷ REFERENCE``: each group's mean training seconds over the reference group's."""
    loaded = {name: [load_results(d) for d in run_dirs] for name, run_dirs in groups.items()}
    if reference is not None and reference not in loaded:
        raise ConfigError(f"reference group {reference!r} has no finished run; groups: {', '.join(loaded)}")
    text = any(_is_text(r) for results in loaded.values() for r in results)
    if text:
        header = ("runs", "n", "val bpb", "trainable %", "stored %", "factored stored %", "tok/s full-rank",
                  "tok/s low-rank", "train s", "peak MB")
    else:
        header = ("runs", "n", "top1", "trainable %", "stored %", "factored stored %", "train s", "peak MB")
    if reference is not None:
        header = (*header[:-1], f"time ÷ {reference}", header[-1])
        reference_seconds = statistics.mean(r["train_seconds"] for r in loaded[reference])
    rows = []
    for name, results in loaded.items():
        def stat(values: list[float | None], fmt: str) -> str:
            values = [v for v in values if v is not None]
            if not values:
                return "—"
            if len(values) == 1:
                return f"{values[0]:{fmt}}"
            return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"

        score = stat([r.get("val_bpb") for r in results], ".4f") if text else \
            stat([100 * r["top1"] for r in results], ".2f")
        rates = (stat([_scaled(factored_stored_fraction(r), 100) for r in results], ".1f"),
                 *((stat([r.get("tokens_per_second_full_rank") for r in results], ",.0f"),
                    stat([r.get("tokens_per_second_low_rank") for r in results], ",.0f")) if text else ()))
        ratio = () if reference is None else \
            (f"{statistics.mean(r['train_seconds'] for r in results) / reference_seconds:.2f}",)
        rows.append((name, str(len(results)), score,
                     stat([100 * r["trainable_params"] / r["dense_params"] for r in results], ".1f"),
                     stat([100 * r["stored_params"] / r["dense_params"] for r in results], ".1f"),
                     *rates,
                     stat([r["train_seconds"] for r in results], ".0f"),
                     *ratio,
                     stat([r["peak_rss_mb"] for r in results], ".0f")))
    return _markdown(header, rows)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else factor * value


def _markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
