"""Read a grid file of benchmarks/experiments.py and check its optional keys: ``borrow`` (groups whose runs another
grid trains, shown on this grid's page), ``curves`` (groups drawn as one line on the stored-fraction figure) and
``reference`` (the group whose mean training time the page's "time ÷" column divides by).

    borrow: {full-rank: lm_tune/full-rank-lr1e-3}        # GROUP here: OTHER_GRID/GROUP there (a grid file next to
                                                         # this one, its name without .yaml)
    curves: {cutoff sweep: [c0.05, c0.1, c0.15], budget: [b0.5, b0.25, b0.1]}
    reference: full-rank
"""
from __future__ import annotations

import os

import yaml


def read_grid(path: str) -> dict:
    """The grid file as written, with its absolute ``path`` and its ``name`` (the file name without ``.yaml``)."""
    with open(path) as f:
        grid = yaml.safe_load(f)
    grid["path"] = os.path.abspath(path)
    grid["name"] = os.path.splitext(os.path.basename(path))[0]
    return grid


def load_grid(path: str) -> dict:
    """:func:`read_grid`, its borrowed groups resolved in ``borrowed`` (``{GROUP: (other grid, its GROUP)}``) and its
    ``curves`` and ``reference`` checked (``{}`` and ``None`` when absent); a bad ``borrow``, ``curves`` or
    ``reference`` is a SystemExit naming the fix."""
    grid = read_grid(path)
    grid["borrowed"] = borrowed_groups(grid)
    grid["curves"] = checked_curves(grid)
    known = [*grid["borrowed"], *grid["groups"]]
    grid["reference"] = grid.get("reference")
    if grid["reference"] is not None and grid["reference"] not in known:
        raise SystemExit(f"{grid['path']}: reference: no group {grid['reference']!r} in this grid; its groups: "
                         f"{', '.join(known)}")
    return grid


def borrowed_groups(grid: dict) -> dict[str, tuple[dict, str]]:
    """``borrow: {GROUP: OTHER_GRID/OTHER_GROUP}`` -> ``{GROUP: (the other grid as read, OTHER_GROUP)}``."""
    borrow = grid.get("borrow") or {}
    where = f"{grid['path']}: borrow"
    if not isinstance(borrow, dict):
        raise SystemExit(f"{where} must map a group name to OTHER_GRID/GROUP, got {borrow!r}")
    folder = os.path.dirname(grid["path"])
    borrowed = {}
    for group, source in borrow.items():
        if group in grid["groups"]:
            raise SystemExit(f"{where}: {group} is also a group trained by this grid; a group is trained here or "
                             f"borrowed, not both: rename one of them")
        other_name, _, other_group = source.partition("/") if isinstance(source, str) else ("", "", "")
        if not other_name or not other_group or "/" in other_group:
            raise SystemExit(f"{where}: {group}: {source!r} is not OTHER_GRID/GROUP (OTHER_GRID: a grid file's name "
                             f"in {folder} without .yaml), e.g. lm_tune/full-rank-lr1e-3")
        other_path = os.path.join(folder, f"{other_name}.yaml")
        if not os.path.exists(other_path):
            known = sorted(name.removesuffix(".yaml") for name in os.listdir(folder) if name.endswith(".yaml"))
            raise SystemExit(f"{where}: {group}: no grid {other_name} ({other_path} does not exist); the grids: "
                             f"{', '.join(known)}")
        other = read_grid(other_path)
        if other_group not in other["groups"]:
            raise SystemExit(f"{where}: {group}: grid {other_name} trains no group {other_group}; its groups: "
                             f"{', '.join(other['groups'])}")
        borrowed[group] = (other, other_group)
    return borrowed


def checked_curves(grid: dict) -> dict[str, list[str]]:
    """``curves: {LABEL: [GROUP, ...]}``, every group one of the grid's (trained or borrowed)."""
    curves = grid.get("curves") or {}
    where = f"{grid['path']}: curves"
    if not isinstance(curves, dict) or not all(isinstance(groups, list) for groups in curves.values()):
        raise SystemExit(f"{where} must map a curve's label to a list of group names, got {curves!r}")
    known = [*grid["borrowed"], *grid["groups"]]
    for label, groups in curves.items():
        for group in groups:
            if group not in known:
                raise SystemExit(f"{where}: {label}: no group {group!r} in this grid; its groups: {', '.join(known)}")
    return curves
