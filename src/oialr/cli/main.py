"""The ``oialr`` command: ``oialr train``, ``oialr compare`` and ``oialr stability``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .settings import DATASETS, METHODS, MODELS, ConfigError, TrainConfig, build_config, given_settings, load_yaml


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (full-rank, OIALR or a peer method) on MNIST-1D, "
                                     "Fashion-MNIST or text",
                       description="Train a model; with no options: the embedded default (MNIST-1D, small CNN, "
                                   "OIALR, 30 epochs, about a minute on 2 CPU cores). Data-parallel on N "
                                   "processes: torchrun --nproc-per-node N -m oialr train ... (--batch-size "
                                   "stays the global batch).")
    p.add_argument("--config", metavar="FILE.yaml", help="settings file (see configs/)")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-dir", help="the dataset's files: Fashion-MNIST's IDX files, or for text a text file "
                                       "or a folder of them (default: Debian's fortunes)")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch, split evenly over the processes")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", default="runs/default", help="run folder (default: runs/default)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set oialr.cutoff=0.2 --set model_args.depth=4 "
                        "(repeatable; values are YAML)")


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="a markdown table of finished runs side by side")
    p.add_argument("runs", nargs="+", metavar="DIR")
    p.add_argument("--by-epoch", action="store_true", help="one column per epoch of --key instead")
    p.add_argument("--key", default="test_top1", help="the metrics.jsonl key --by-epoch shows (default: test_top1)")


def _stability_parser(sub) -> None:
    p = sub.add_parser("stability", help="plots and a summary of a run's basis-stability series",
                       description="Reads DIR/stability.jsonl (train with --set stability_every=N) and writes "
                                   "stability_network.png, stability_layers.png, spectra.png, stability_summary.json.")
    p.add_argument("run", metavar="DIR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oialr", description="Orthogonality-Informed Adaptive Low-Rank training")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _compare_parser(sub)
    _stability_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "stability":
            from .stability_report import report
            print(json.dumps(report(args.run), indent=2))
            return 0
        from .compare import compare_table, epoch_table
        print(compare_table(args.runs) if not args.by_epoch else epoch_table(args.runs, args.key))
        return 0
    except (ConfigError, _data_error()) as err:
        print(f"{_prog()}: error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from ..distributed import process_group_from_env, process_rank, world_size
    from ..health import DegenerateStateError
    from .failures import Diverged, describe
    from .interrupts import Interrupted, exit_code, stop_signals_held
    from .reporting import done_message
    from .start import start_or_resume

    flags = {"dataset": args.dataset, "data_dir": args.data_dir, "model": args.model, "method": args.method,
             "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    file_values = load_yaml(args.config) if args.config else None
    given = args.config or args.overrides or any(v is not None for v in flags.values())
    cfg = None
    if given or not args.resume:
        cfg = build_config(file_values, args.overrides, **flags)
    timeout = (cfg or TrainConfig()).dist_timeout
    with process_group_from_env(timeout):   # under torchrun: one process of the group; else nothing to do
        run = start_or_resume(cfg, args.out, args.resume,
                              given=given_settings(file_values, args.overrides, **flags) if cfg else None)
        with stop_signals_held():           # until the run's last line is out (the run stops on them inside)
            try:
                results = run.train()
            except Interrupted as err:
                run.log(f"oialr: {err}", file=sys.stderr)
                return exit_code(err)
            except Exception as err:
                line = describe(err, args.out, rank=process_rank(), world_size=world_size(), timeout=timeout)
                if line is None:
                    raise
                if process_rank() == 0 or not isinstance(err, (DegenerateStateError, Diverged)):   # same on all
                    print(f"{_prog()}: error: {line}", file=sys.stderr)
                return 1
            run.log(f"done: {done_message(results)}; results in {args.out}/results.json")
    return 0


def _prog() -> str:
    """``oialr``, or ``oialr[rank R]`` in a torchrun job: an error may concern one process only."""
    return "oialr" if os.environ.get("WORLD_SIZE", "1") in ("", "1") else f"oialr[rank {os.environ.get('RANK')}]"


def _data_error() -> type[Exception]:
    from .data import DataError
    return DataError


if __name__ == "__main__":
    sys.exit(main())
