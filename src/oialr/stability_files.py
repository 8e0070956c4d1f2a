"""A stability tracker's records as results files: one JSON object per sample, or one CSV row per (sample, layer)
plus the network rows; each written atomically (:mod:`oialr.files`)."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

from . import files

NETWORK_ROWS = ("network:mean", "network:weighted")     # the `layer` of the network rows in write_csv
CSV_FIELDS = ("step", "layer", "rows", "cols", "stability", "sigma_max", "effective_rank", "rank_at_cutoff", "mixing")


def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """One JSON object per record (per sample)."""
    files.write_text(os.fspath(path), "".join(json.dumps(record) + "\n" for record in records))


def write_csv(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Columns :data:`CSV_FIELDS`: one row per (step, layer) and per step the rows ``network:mean`` and
    ``network:weighted`` (stability only); None is an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    for record in records:
        for name, values in record["layers"].items():
            m, n = values["shape"]
            writer.writerow({"step": record["step"], "layer": name, "rows": m, "cols": n,
                             **{k: "" if v is None else v for k, v in values.items() if k != "shape"}})
        for name, key in zip(NETWORK_ROWS, ("network_stability", "weighted_stability")):
            value = record[key]
            writer.writerow({"step": record["step"], "layer": name, "stability": "" if value is None else value})
    files.write_text(os.fspath(path), buffer.getvalue())
