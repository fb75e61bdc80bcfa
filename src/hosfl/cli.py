"""``hosfl``: run | resume | compare | plot | eval | replay. Argument parsing only.

Every user error (bad config, missing data, corrupt checkpoint) is one line on stderr and exit
code 2; nothing already on disk is overwritten.
"""

from __future__ import annotations

import argparse
import sys

from hosfl.checkpoint import CheckpointError
from hosfl.config import Config, ConfigError, method_names
from hosfl.data.fashion_mnist import DataError
from hosfl.protocol import ProtocolError
from hosfl.tasks.base import MissingPackage

USER_ERRORS = (ConfigError, DataError, CheckpointError, ProtocolError, MissingPackage)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hosfl", description="Hybrid-Order Split Federated Learning."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train one method on one task, in-process",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with HO-SFL (default) or a baseline and write a run folder.\n\n"
        "settings (key=value, after any --config file):\n" + "\n".join(Config.help_lines()),
        epilog="example: hosfl run steps=300 seed=7 out=runs/a",
    )
    run.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override one setting")
    rs = sub.add_parser(
        "resume",
        help="continue a run that stopped (crash, kill) from its last checkpoint",
        description="Continue RUN from RUN/checkpoint.pt to its configured steps. Steps redone "
        "are checked against RUN/journal.sqlite; the result equals an uninterrupted run.",
    )
    rs.add_argument("run_folder")
    ev = sub.add_parser("eval", help="test accuracy of a checkpoint")
    ev.add_argument("checkpoint", help="a checkpoint.pt written by hosfl run")
    rp = sub.add_parser(
        "replay",
        help="rebuild a run's client model from its (seeds, v̄) history and check it",
        description="Replay RUN/journal.sqlite from RUN/client_init.pt and compare the result "
        "with the client weights in RUN/checkpoint.pt, bit for bit.",
    )
    rp.add_argument("run_folder")
    cmp = sub.add_parser(
        "compare",
        help="run several methods on the same data, seed and budget; table and plots",
        description="Run each method with the same settings (key=value as for 'hosfl run'), "
        "then write results.csv, results.md and PNG plots into one folder.",
        epilog="example: hosfl compare --methods hosfl,sfl-v1,frozen steps=300 partition=dirichlet",
    )
    cmp.add_argument(
        "--methods",
        default=",".join(method_names()),
        help=f"comma-separated, from {', '.join(method_names())} (default: all)",
    )
    cmp.add_argument(
        "--target",
        type=float,
        default=0.8,
        help="accuracy for the steps-to-target column (default: 0.8)",
    )
    cmp.add_argument("--out", default="", help="output folder (default: runs/compare-<time>)")
    cmp.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    cmp.add_argument("overrides", nargs="*", metavar="key=value")
    pl = sub.add_parser("plot", help="redraw the plots of saved run folders")
    pl.add_argument("run_folders", nargs="+")
    pl.add_argument("--out", default=".", help="where to write the PNGs (default: .)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from hosfl.runner import run, summary_table

            result = run(Config.load(args.config, args.overrides))
            print(summary_table(result))
            if result.summary["diverged_at"] is not None:
                return 3
        elif args.command == "resume":
            from hosfl.runner import resume, summary_table

            result = resume(args.run_folder)
            print(summary_table(result))
            if result.summary["diverged_at"] is not None:
                return 3
        elif args.command == "eval":
            from hosfl.runner import evaluate_checkpoint

            acc, loss, steps = evaluate_checkpoint(args.checkpoint)
            print(f"{args.checkpoint}: step {steps}, test accuracy {acc:.4f}, loss {loss:.4f}")
        elif args.command == "compare":
            from hosfl.compare import compare

            overrides = ["eval_every=100", *args.overrides]  # a finer curve than a single run's
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            compare(methods, overrides, args.out, args.target, args.config)
        elif args.command == "plot":
            from hosfl.metrics.plots import plot_runs

            for path in plot_runs(args.run_folders, args.out):
                print(f"written: {path}")
        elif args.command == "replay":
            from hosfl.replay import replay_run

            report = replay_run(args.run_folder)
            print(report.describe())
            return 0 if report.identical else 1
    except USER_ERRORS as e:
        print(f"hosfl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hosfl: interrupted; the run folder keeps the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
