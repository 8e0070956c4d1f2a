"""Wall clock of whole ``oialr train`` runs, full-rank vs OIALR on the same data, alternated; median time ratio."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import harness

METHODS = ("full-rank", "oialr")


@dataclass(frozen=True)
class Recipe:
    """A training recipe of the CLI and its OIALR schedule at its own length (``epochs``)."""

    name: str
    flags: tuple[str, ...]
    epochs: int
    warmup_steps: int
    update_every: int

    def schedule(self, epochs: int) -> list[str]:
        """``--epochs`` and, for a shorter or longer run, the OIALR schedule scaled by ``epochs / self.epochs`` so
        the warm-up and update interval keep their share of the run."""
        if epochs == self.epochs:
            return ["--epochs", str(epochs)]
        scale = epochs / self.epochs
        return ["--epochs", str(epochs), "--set", f"oialr.warmup_steps={max(1, round(self.warmup_steps * scale))}",
                "--set", f"oialr.update_every={max(1, round(self.update_every * scale))}"]


RECIPES = {r.name: r for r in (
    Recipe("mnist1d-cnn", ("--dataset", "mnist1d", "--model", "cnn"), 30, 300, 60),   # the CLI's embedded default
    Recipe("fmnist-vit", ("--config", "configs/fmnist_vit.yaml"), 10, 800, 160),     # configs/fmnist_vit.yaml
)}


def command(recipe: Recipe, method: str, epochs: int, threads: int, out: str, overrides: list[str]) -> list[str]:
    oialr = os.path.join(os.path.dirname(sys.executable), "oialr")
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [oialr, "train", *recipe.flags, "--method", method, *recipe.schedule(epochs), "--set", f"threads={threads}",
            *sets, "--out", out]


def measure(recipe: Recipe, *, repeats: int, epochs: int, threads: int, overrides: list[str] = ()) -> dict:
    """``repeats`` pairs of runs, the order within a pair alternating. Returns plain data: per pair the
    ``results.json`` of each method and the cores other processes kept busy during each run, the per-pair time
    ratios OIALR / full-rank and their median, the commands of the first pair and the load before and after."""
    root = tempfile.mkdtemp(prefix=f"oialr-e2e-{recipe.name}-")
    pairs, commands = [], []
    load_before = harness.load()
    for i in range(repeats):
        results, foreign = {}, {}
        for method in (METHODS if i % 2 == 0 else METHODS[::-1]):
            cmd = command(recipe, method, epochs, threads, os.path.join(root, f"{method}-{i}"), list(overrides))
            if i == 0:
                commands.append(" ".join(cmd))
            with harness.ForeignLoad() as other:
                subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=repo_root())
            with open(os.path.join(cmd[-1], "results.json")) as f:
                results[method] = json.load(f)
            foreign[method] = other.cores
        pairs.append({"results": results, "foreign_cores": foreign})
    ratios = [p["results"]["oialr"]["train_seconds"] / p["results"]["full-rank"]["train_seconds"] for p in pairs]
    return {"recipe": recipe.name, "epochs": epochs, "repeats": repeats, "commands": commands, "pairs": pairs,
            "load_before": load_before, "load_after": harness.load(), "ratios": ratios,
            "ratio": harness.median(ratios)}


def render(numbers: dict) -> str:
    """:func:`measure`'s numbers as a markdown section."""
    rows = []
    for i, (pair, ratio) in enumerate(zip(numbers["pairs"], numbers["ratios"])):
        full, low = pair["results"]["full-rank"], pair["results"]["oialr"]
        foreign = pair["foreign_cores"]
        rows.append([i + 1, f"{full['train_seconds']:.1f}", f"{low['train_seconds']:.1f}", f"{ratio:.3f}",
                     f"{full['top1']:.3f}", f"{low['top1']:.3f}", f"{low['trainable_params']:,} of "
                     f"{low['dense_params']:,}", low.get("transition_step"),
                     f"{foreign['full-rank']:.2f} / {foreign['oialr']:.2f}"])
    return "\n".join([
        f"### End to end: {numbers['recipe']}, {numbers['epochs']} epochs, {numbers['repeats']} alternated pairs", "",
        f"Load average {numbers['load_before']} before, {numbers['load_after']} after. `train_seconds` from "
        "`results.json` (the training loop only, no evaluation). Commands of the first pair (the order alternates "
        "per pair):", "",
        "```", *numbers["commands"], "```", "",
        harness.markdown_table(["pair", "full-rank s", "OIALR s", "ratio", "full-rank top-1", "OIALR top-1",
                                "OIALR trainable params (end)", "transition step",
                                "other processes' cores (full-rank / OIALR run)"], rows), "",
        f"Median OIALR / full-rank training time: **{numbers['ratio']:.3f}**.", ""])


def run(recipe: Recipe, *, repeats: int, epochs: int, threads: int, overrides: list[str] = ()) -> tuple[str, dict]:
    """:func:`measure` then :func:`render`: the markdown section and the numbers."""
    numbers = measure(recipe, repeats=repeats, epochs=epochs, threads=threads, overrides=overrides)
    return render(numbers), numbers


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--e2e", choices=sorted(RECIPES), default="mnist1d-cnn", help="training recipe")
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs (full-rank, OIALR)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the recipe's; the OIALR schedule is scaled)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `oialr train --set` override for both methods (repeatable)")
    args = p.parse_args(argv)
    recipe = RECIPES[args.e2e]
    text, _ = run(recipe, repeats=args.repeats, epochs=args.epochs or recipe.epochs, threads=args.threads,
                  overrides=args.overrides)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
