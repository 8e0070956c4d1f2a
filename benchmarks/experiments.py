"""Run a grid of `oialr train` runs (resumable across sessions) and write a results table to docs/.

    .venv/bin/python benchmarks/experiments.py benchmarks/grids/fmnist_vit.yaml            # run what is missing
    .venv/bin/python benchmarks/experiments.py benchmarks/grids/fmnist_vit.yaml --report   # only rewrite the table

A grid file names a base config, an output folder, a results page and groups of runs; every group runs once per seed:

    base: configs/fmnist_vit.yaml
    out: runs/fmnist_vit
    report: docs/results/fmnist_vit.md
    seeds: [0, 1, 2]
    groups:
      full-rank: {method: full-rank}
      oialr-paper: {method: oialr, oialr: {warmup_steps: 800, update_every: 160, cutoff: 0.15}}

A finished run (its results.json exists) is skipped; an interrupted one (checkpoint.pt, no results.json) is resumed
with --resume; groups run seed by seed, interleaved, so a stopped session leaves comparable partial results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from oialr import files  # noqa: E402
from oialr.cli.compare import aggregate_table, compare_table  # noqa: E402


def flatten(mapping: dict, prefix: str = "") -> list[str]:
    """``{"oialr": {"cutoff": 0.2}, "epochs": 3}`` -> ``["oialr.cutoff=0.2", "epochs=3"]`` (values as YAML)."""
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")       # JSON values are YAML
    return items


def run_dirs(grid: dict) -> dict[str, list[str]]:
    return {group: [os.path.join(grid["out"], f"{group}-s{seed}") for seed in grid["seeds"]]
            for group in grid["groups"]}


def run_missing(grid: dict, oialr_cmd: list[str]) -> None:
    for seed_index, seed in enumerate(grid["seeds"]):
        for group, settings in grid["groups"].items():
            out = run_dirs(grid)[group][seed_index]
            if os.path.exists(os.path.join(out, "results.json")):
                continue
            resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
            cmd = oialr_cmd + ["train", "--out", out]
            if resume:
                cmd.append("--resume")
            else:
                cmd += ["--config", grid["base"], "--seed", str(seed)]
                cmd += [arg for item in flatten(settings) for arg in ("--set", item)]
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
            code = subprocess.call(cmd, cwd=ROOT)
            if code != 0:
                sys.exit(f"run {out} stopped with exit code {code}; rerun this command to resume it")


def write_report(grid: dict, grid_path: str) -> str:
    groups = run_dirs(grid)
    finished = {g: [d for d in dirs if os.path.exists(os.path.join(ROOT, d, "results.json"))]
                for g, dirs in groups.items()}
    finished = {g: [os.path.join(ROOT, d) for d in dirs] for g, dirs in finished.items() if dirs}
    lines = [f"# {os.path.basename(grid['report']).removesuffix('.md')}", "",
             f"Grid `{os.path.relpath(grid_path, ROOT)}` on `{grid['base']}`; produced by",
             "", "```bash", f".venv/bin/python benchmarks/experiments.py {os.path.relpath(grid_path, ROOT)}", "```", "",
             "## Mean ± std over seeds", "", aggregate_table(finished) if finished else "(no finished run yet)", "",
             "## Every run", "",
             compare_table([d for dirs in finished.values() for d in dirs]) if finished else "(none)", "",
             "## Groups", ""]
    lines += [f"- `{group}`: `{' '.join(flatten(settings)) or '(base config)'}`"
              for group, settings in grid["groups"].items()]
    if grid.get("notes"):
        lines += ["", "## Notes", "", grid["notes"].strip()]
    text = "\n".join(lines) + "\n"
    files.write_text(os.path.join(ROOT, grid["report"]), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="grid YAML file")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from finished runs")
    args = parser.parse_args()
    with open(args.grid) as f:
        grid = yaml.safe_load(f)
    if not args.report:
        run_missing(grid, [os.path.join(ROOT, ".venv", "bin", "oialr")])
    print(write_report(grid, os.path.abspath(args.grid)))


if __name__ == "__main__":
    main()
