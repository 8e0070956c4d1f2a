"""Run grids of `oialr train` runs (resumable across sessions and machines) and write their results tables to docs/.

    .venv/bin/python benchmarks/experiments.py benchmarks/grids/fmnist_vit.yaml            # run what is missing
    .venv/bin/python benchmarks/experiments.py benchmarks/grids/fmnist_vit.yaml --report   # only rewrite the table
    .venv/bin/python benchmarks/experiments.py GRID1.yaml GRID2.yaml --only c0.3-s0 --only fmnist_vit/full-rank-s2 \\
        --workers 2 --threads 1      # two runs at a time, one intra-op thread each, in the order given

A grid file names a base config, an output folder, a results page and groups of runs; every group runs once per seed:

    base: configs/fmnist_vit.yaml
    out: runs/fmnist_vit
    report: docs/results/fmnist_vit.md
    seeds: [0, 1, 2]
    groups:
      full-rank: {method: full-rank}
      oialr-paper: {method: oialr, oialr: {warmup_steps: 800, update_every: 160, cutoff: 0.15}}
    borrow: {c0.3: fmnist_vit_sweep/c0.3}          # optional: runs another grid trains, shown on this page
    curves: {cutoff sweep: [oialr-paper, c0.3]}    # optional: lines on the stored-fraction figure

Run ``GROUP-sSEED`` trains in ``OUT/GROUP-sSEED`` (its output in ``OUT/GROUP-sSEED.log``). When it finishes, its
``results.json`` and ``metrics.jsonl`` are archived next to the report (``docs/results/fmnist_vit/GROUP-sSEED/``,
kept in git), so a finished run is never trained again and its numbers stay in the report on a new machine. An
interrupted run (``checkpoint.pt``, no results) is resumed with ``--resume``. Without ``--only``, runs go seed by
seed, groups interleaved, so a stopped session leaves comparable partial results. A borrowed group
(``benchmarks/grid_files.py``) is never trained by this grid: its runs for this grid's seeds are read from the run
folders or archive of the grid that trains them. On two CPU cores, two 1-thread runs side by side train ~1.3x
more steps per second than one 2-thread run, but each run's time then includes sharing the machine with another:
say so next to the times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))      # its siblings grid_files and grid_plots

from oialr import files  # noqa: E402
import grid_files  # noqa: E402
import grid_plots  # noqa: E402
from oialr.cli.compare import aggregate_table, compare_table, load_results  # noqa: E402

ARCHIVED = ("results.json", "metrics.jsonl")


@dataclass(frozen=True)
class Run:
    grid: dict
    group: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.group}-s{self.seed}"

    @property
    def out(self) -> str:
        """The run folder, relative to the repository root (where the commands run)."""
        return os.path.join(self.grid["out"], self.name)

    @property
    def archive(self) -> str:
        return os.path.join(ROOT, os.path.splitext(self.grid["report"])[0], self.name)

    def finished_dir(self) -> str | None:
        """The folder holding this run's results.json (the run folder, else its archive), or None."""
        for folder in (os.path.join(ROOT, self.out), self.archive):
            if os.path.exists(os.path.join(folder, "results.json")):
                return folder
        return None

    def command(self, oialr: str, threads: int | None) -> list[str]:
        cmd = [oialr, "train", "--out", self.out]
        if os.path.exists(os.path.join(ROOT, self.out, "checkpoint.pt")):
            return cmd + ["--resume"]
        cmd += ["--config", self.grid["base"], "--seed", str(self.seed)]
        settings = flatten(self.grid["groups"][self.group]) + ([f"threads={threads}"] if threads else [])
        return cmd + [arg for item in settings for arg in ("--set", item)]


def flatten(mapping: dict, prefix: str = "") -> list[str]:
    """``{"oialr": {"cutoff": 0.2}, "epochs": 3}`` -> ``["oialr.cutoff=0.2", "epochs=3"]`` (values as YAML)."""
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")       # JSON values are YAML
    return items


def grid_runs(grid: dict) -> list[Run]:
    """Every run of ``grid``, seed by seed, groups interleaved."""
    return [Run(grid, group, seed) for seed in grid["seeds"] for group in grid["groups"]]


def page_runs(grid: dict) -> dict[str, list[Run]]:
    """Per group on the grid's page (borrowed ones first, as runs of the grid that trains them), its runs for the
    grid's seeds."""
    sources = {**grid["borrowed"], **{group: (grid, group) for group in grid["groups"]}}
    return {group: [Run(source, name, seed) for seed in grid["seeds"]] for group, (source, name) in sources.items()}


def select(grids: list[dict], only: list[str]) -> list[Run]:
    """The runs of ``grids`` named in ``only`` (in that order), or all of them. A name is ``GROUP-sSEED``, or
    ``GRID/GROUP-sSEED`` (``GRID``: the grid file's name without ``.yaml``) where several grids have that run."""
    runs = {f"{grid['name']}/{run.name}": run for grid in grids for run in grid_runs(grid)}
    if not only:
        return list(runs.values())
    chosen = []
    for name in only:
        refuse_borrowed(grids, name)
        matches = [key for key, run in runs.items() if name in (key, run.name)]
        if len(matches) != 1:
            problem = f"matches {' and '.join(matches)}" if matches else "is no run of these grids"
            raise SystemExit(f"--only {name}: {problem}; name a run as GROUP-sSEED or GRID/GROUP-sSEED, one of: "
                             f"{', '.join(runs)}")
        chosen.append(runs[matches[0]])
    return chosen


def refuse_borrowed(grids: list[dict], name: str) -> None:
    """A SystemExit when ``--only name`` is a borrowed run of one of ``grids``, naming the command that trains it."""
    for grid in grids:
        for group, (other, other_group) in grid["borrowed"].items():
            for seed in grid["seeds"]:
                if name in (f"{grid['name']}/{group}-s{seed}", f"{group}-s{seed}"):
                    raise SystemExit(f"--only {name}: {grid['name']} borrows {group} from {other['name']}/"
                                     f"{other_group}, which trains it: .venv/bin/python benchmarks/experiments.py "
                                     f"{os.path.relpath(other['path'], ROOT)} --only {other_group}-s{seed}")


def archive(run: Run) -> None:
    """Copy the run's small result files to its archive folder (kept in git), each written whole or not at all."""
    for name in ARCHIVED:
        source = os.path.join(ROOT, run.out, name)
        if os.path.exists(source):
            with open(source) as f:
                files.write_text(os.path.join(run.archive, name), f.read())


def run_missing(runs: list[Run], oialr: str, *, workers: int, threads: int | None) -> None:
    """Train the unfinished ``runs``, ``workers`` at a time; archive each as it finishes and rewrite its grid's
    report. After a failure no new run starts; the ones running finish."""
    queue = [run for run in runs if run.finished_dir() is None]
    running: dict[subprocess.Popen, Run] = {}
    failed: list[str] = []
    while queue or running:
        while queue and len(running) < workers and not failed:
            run = queue.pop(0)
            cmd = run.command(oialr, threads)
            os.makedirs(os.path.join(ROOT, os.path.dirname(run.out)), exist_ok=True)
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
            with open(os.path.join(ROOT, run.out + ".log"), "a") as log:
                running[subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)] = run
        if not running:
            break
        proc = _wait_any(running)
        run = running.pop(proc)
        if proc.returncode == 0:
            archive(run)
            write_report(run.grid)
            print(f"[{time.strftime('%H:%M:%S')}] finished {run.name}", flush=True)
        else:
            failed.append(f"{run.out} (exit code {proc.returncode}; its output: {run.out}.log)")
    if failed:
        sys.exit("stopped: " + "; ".join(failed) + "; rerun this command to resume")


def _wait_any(running: dict[subprocess.Popen, Run]) -> subprocess.Popen:
    while True:
        for proc in running:
            if proc.poll() is not None:
                return proc
        time.sleep(2)


def write_report(grid: dict) -> str:
    finished: dict[str, list[str]] = {}
    for group, runs in page_runs(grid).items():
        folders = [folder for folder in (run.finished_dir() for run in runs) if folder is not None]
        if folders:
            finished[group] = folders
    reference = grid["reference"] if grid["reference"] in finished else None     # the time ratio once it ran
    lines = [f"# {os.path.basename(grid['report']).removesuffix('.md')}", "",
             f"Grid `{os.path.relpath(grid['path'], ROOT)}` on `{grid['base']}`; produced by", "",
             "```bash", f".venv/bin/python benchmarks/experiments.py {os.path.relpath(grid['path'], ROOT)}", "```", "",
             "## Mean ± std over seeds", "",
             aggregate_table(finished, reference) if finished else "(no finished run yet)", "",
             "## Every run", "",
             compare_table([d for dirs in finished.values() for d in dirs]) if finished else "(none)", ""]
    if finished:
        lines += ["## Figures", ""] + figures(grid, finished)
    lines += ["## Groups", ""]
    lines += [group_line(grid, group, runs) for group, runs in page_runs(grid).items()]
    if grid.get("notes"):
        lines += ["", "## Notes", "", grid["notes"].strip()]
    text = "\n".join(lines) + "\n"
    files.write_text(os.path.join(ROOT, grid["report"]), text)
    return text


def group_line(grid: dict, group: str, runs: list[Run]) -> str:
    """The group's settings; for a borrowed group also where it comes from and its seeds not finished there."""
    source, name = runs[0].grid, runs[0].group
    settings = f"`{' '.join(flatten(source['groups'][name])) or '(base config)'}`"
    if source is grid:
        return f"- `{group}`: {settings}"
    missing = [str(run.seed) for run in runs if run.finished_dir() is None]
    unfinished = f"; not finished for seed {', '.join(missing)}" if missing else ""
    return (f"- `{group}`: borrowed from `{source['name']}/{name}` (trained by "
            f"`{os.path.relpath(source['path'], ROOT)}`{unfinished}): {settings}")


def figures(grid: dict, finished: dict[str, list[str]]) -> list[str]:
    """Draw the grid's two figures next to its page (:mod:`grid_plots`); return the page's lines for them."""
    metric = grid_plots.metric_of([load_results(d) for dirs in finished.values() for d in dirs])
    folder = os.path.splitext(os.path.join(ROOT, grid["report"]))[0]
    name = os.path.basename(folder)
    try:
        curves, no_curve = grid_plots.metric_curves(finished, metric)
        points, no_point = grid_plots.metric_by_stored(finished, metric)
        grid_plots.render(metric, curves, grid_plots.frontier(points, grid["curves"]), folder)
    except ImportError as err:
        return [f"(not drawn: {err}; pip install matplotlib)", ""]
    lines = [f"![{metric.title} against training seconds]({name}/{metric.short}_vs_time.png)", "",
             f"![{metric.title} against stored parameters]({name}/{metric.short}_vs_stored.png)", ""]
    if no_curve or no_point:
        lines += [f"Not in the figure against time: {', '.join(no_curve) or 'none'}; not in the figure against "
                  f"stored parameters: {', '.join(no_point) or 'none'}.", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+", metavar="GRID", help="grid YAML files")
    parser.add_argument("--report", action="store_true", help="only rewrite the reports from finished runs")
    parser.add_argument("--only", action="append", default=[], metavar="[GRID/]GROUP-sSEED",
                        help="run only these runs, in this order (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at the same time (default 1)")
    parser.add_argument("--threads", type=int, help="intra-op threads of each new run (default: torch's)")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--workers and --threads must be >= 1")
    grids = [grid_files.load_grid(path) for path in args.grids]
    runs = select(grids, args.only)
    for run in (run for grid in grids for run in grid_runs(grid)):     # finished outside this command
        if os.path.exists(os.path.join(ROOT, run.out, "results.json")) and \
                not os.path.exists(os.path.join(run.archive, "results.json")):
            archive(run)
    if not args.report:
        run_missing(runs, os.path.join(ROOT, ".venv", "bin", "oialr"), workers=args.workers, threads=args.threads)
    for grid in grids:
        print(write_report(grid))


if __name__ == "__main__":
    main()
