"""``hosfl``: run | resume | compare | timeline | plot | eval | export | replay | serve | client |
keys. Argument parsing only.

Every user error (bad config, missing data, corrupt checkpoint) is one line on stderr and exit
code 2; nothing already on disk is overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hosfl import methods as registry
from hosfl.checkpoint import CheckpointError
from hosfl.config import Config, ConfigError
from hosfl.data.fashion_mnist import DataError
from hosfl.packages import MissingPackage
from hosfl.protocol import ProtocolError

USER_ERRORS = (ConfigError, DataError, CheckpointError, ProtocolError, MissingPackage)


LEGACY = "take files of releases before checksums and digests, without those checks"


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
    ev = sub.add_parser("eval", help="the task's test metric (accuracy by default) of a checkpoint")
    ev.add_argument("checkpoint", help="a checkpoint.pt written by hosfl run")
    ex = sub.add_parser("export", help="the trained model of a run folder, whole, into a folder")
    ex.add_argument("run_folder")
    ex.add_argument("--out", required=True, help="a new folder: save_pretrained files for a "
                    "transformers model, else model.pt (the state dict)")  # fmt: skip
    ex.add_argument("--keep-lora", action="store_true", help="a LoRA run: the base model in "
                    "--out and its adapters in --out/lora (peft), not merged")  # fmt: skip
    for p in (rs, ev):
        p.add_argument("--legacy", action="store_true", help=LEGACY)
    rp = sub.add_parser(
        "replay",
        help="rebuild a run's client model from its (seeds, v̄) history and check it",
        description="Replay RUN/journal.sqlite from RUN/client_init.pt and compare the result "
        "with the client weights in RUN/checkpoint.pt, bit for bit.",
    )
    rp.add_argument("run_folder")
    rp.add_argument("--legacy", action="store_true", help=LEGACY)
    cmp = sub.add_parser(
        "compare",
        help="run several methods on the same data, seed and budget; table and plots",
        description="Run each method with the same settings (key=value as for 'hosfl run'), "
        "then write results.csv, results.md and PNG plots into one folder.",
        epilog="example: hosfl compare --methods hosfl,sfl-v1,frozen steps=300 partition=dirichlet",
    )
    cmp.add_argument(
        "--methods",
        default=",".join(registry.METHODS),
        help=f"comma-separated, from {', '.join(registry.METHODS)} (default: all)",
    )
    cmp.add_argument(
        "--target",
        type=float,
        default=None,
        help="accuracy for the steps-to-target column (default: 0.8)",
    )
    cmp.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds: every method once per seed; the table as mean ± sd, the "
        "curves with a band (default: the config's one seed)",
    )
    cmp.add_argument("--out", default="", help="output folder (default: runs/compare-<time>)")
    cmp.add_argument("--profile", metavar="NAME|FILE.toml", help="also time each run under "
                     "a device and link profile (see 'hosfl timeline'); columns and plots")
    cmp.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    cmp.add_argument("overrides", nargs="*", metavar="key=value")
    sv = sub.add_parser(
        "serve",
        help="train with clients that connect over the network (hosfl client)",
        description="'hosfl run engine=net': the server role, the journal, checkpoints and "
        "evaluation, with each client a 'hosfl client' program that connects to 'listen'. "
        "Tokens (and the TLS certificate) are issued into 'secrets' (default RUN/secrets).",
        epilog="example: hosfl serve clients=10 sampled=3 listen=127.0.0.1:7070 out=runs/net",
    )
    sv.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    sv.add_argument("overrides", nargs="*", metavar="key=value", help="as for 'hosfl run'")
    cl = sub.add_parser(
        "client",
        help="one client of a network run, on this device",
        description="Connect to 'hosfl serve', take the run's config from it, and train this "
        "client's part with forward passes until the run is over.",
        epilog="example: hosfl client --server 10.0.0.5:7070 --id 3 --token client-3.token "
        "--ca server.crt",
    )
    cl.add_argument("--server", required=True, metavar="HOST:PORT")
    cl.add_argument("--id", required=True, type=int, help="this client's id (0..M-1)")
    cl.add_argument("--token", required=True, metavar="FILE", help="the token the server issued")
    cl.add_argument("--ca", metavar="FILE", help="the server's certificate (server.crt)")
    cl.add_argument("--no-tls", action="store_true", help="plain connection (loopback only)")
    cl.add_argument(
        "--retry-for", type=float, default=300.0, help="give up after this many seconds without "
        "a server (default: 300)",
    )
    cl.add_argument("--quiet", action="store_true", help="print errors only")
    cl.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="this device's own settings: device, client_device, client_threads",
    )
    ks = sub.add_parser(
        "keys",
        help="issue the client tokens and the server's TLS certificate of a network run",
        description="Write FOLDER/client-N.token for N < CLIENTS and FOLDER/server.crt, "
        "server.key; files already there are kept. Give FOLDER to 'hosfl serve secrets=FOLDER'.",
    )
    ks.add_argument("folder")
    ks.add_argument("--clients", type=int, required=True)
    ks.add_argument("--host", action="append", default=[], help="a name or address the "
                    "certificate must carry (besides localhost and 127.0.0.1); repeatable")
    tl = sub.add_parser(
        "timeline",
        help="the wall clock of runs on real devices and links: time to a target, where it goes",
        description="Simulate each run's steps under a device and link profile (compute, "
        "bandwidth, latency and their spread across clients; stragglers and a deadline), from "
        "the step's exchanges, bytes and compute that the run recorded. Prints a table; with "
        "--out writes timeline.csv, timeline.md and accuracy_vs_time_<profile>.png.",
        epilog="example: hosfl timeline runs/a runs/b --profile phone-lte --out runs/timeline",
    )
    tl.add_argument("run_folders", nargs="*", metavar="FOLDER[:LABEL]",
                    help="run folders, each with an optional label after a colon")
    tl.add_argument("--profile", metavar="NAME|FILE.toml",
                    help="phone-lte, sbc-slow-uplink, laptop-wifi, datacenter, or a TOML file "
                    "of profiles (default: every built-in one)")  # fmt: skip
    tl.add_argument("--target", type=float, default=None, help="the metric value to time "
                    "(default: the best value the worst run reached)")  # fmt: skip
    tl.add_argument("--out", default=None, help="where to write the CSV, table and plots")
    tl.add_argument("--list", action="store_true", help="print the built-in profiles, sourced")
    pl = sub.add_parser("plot", help="redraw the plots of saved run folders")
    pl.add_argument("run_folders", nargs="+", metavar="FOLDER[:LABEL]",
                    help="run folders, each with an optional legend label after a colon")
    pl.add_argument("--out", default=".", help="where to write the PNGs (default: .)")
    return parser


def _labelled(arg: str) -> tuple[str, str]:
    """``FOLDER:LABEL`` (or ``FOLDER``, whose own name may hold a colon) as (folder, label)."""
    folder, colon, label = arg.rpartition(":")
    if not colon or Path(arg).is_dir() or not folder:
        return arg, ""
    return folder, label


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value settings anywhere among the options (before --config as well as after it)
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-")
                                                    for x in extra):  # fmt: skip
        args.overrides = [*args.overrides, *extra]  # in the order given: later wins
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "run":
            from hosfl.runner import run, summary_table

            result = run(Config.load(args.config, args.overrides))
            print(summary_table(result))
            if result.summary["diverged_at"] is not None:
                return 3
        elif args.command == "serve":
            from hosfl.runner import run, summary_table

            result = run(Config.load(args.config, [*args.overrides, "engine=net"]))
            print(summary_table(result))
        elif args.command == "client":
            from hosfl.edge.client import main as client_main

            return client_main(args)
        elif args.command == "keys":
            from hosfl.edge import keys

            folder = keys.issue(args.folder, args.clients, tuple(args.host))
            print(f"written: {folder}/client-0..{args.clients - 1}.token, {keys.CERT}, {keys.KEY}")
        elif args.command == "resume":
            from hosfl.runner import resume, summary_table

            result = resume(args.run_folder, legacy=args.legacy)
            print(summary_table(result))
            if result.summary["diverged_at"] is not None:
                return 3
        elif args.command == "eval":
            from hosfl.runner import evaluate_checkpoint

            value, loss, steps, name = evaluate_checkpoint(args.checkpoint, args.legacy)
            print(f"{args.checkpoint}: step {steps}, test {name} {value:.4f}, loss {loss:.4f}")
        elif args.command == "export":
            from hosfl.export import export

            print(f"written: {export(args.run_folder, args.out, merge=not args.keep_lora)}")
        elif args.command == "compare":
            from hosfl.compare import compare

            overrides = args.overrides
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            try:
                seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or None
            except ValueError:
                raise ConfigError(f"--seeds={args.seeds}: comma-separated integers") from None
            target = {} if args.target is None else {"target": args.target}
            compare(methods, overrides, args.out, config=args.config, seeds=seeds,
                    profile=args.profile, **target)  # fmt: skip
        elif args.command == "timeline":
            from hosfl.timeline import describe, timeline

            if args.list:
                print(describe())
                return 0
            if not args.run_folders:
                parser.error("timeline: give at least one run folder (or --list)")
            folders, labels = zip(*map(_labelled, args.run_folders), strict=True)
            text, _ = timeline(list(folders), args.profile, args.target, args.out, list(labels))
            print(text)
            if args.out:
                print(f"written: {args.out}/timeline.csv, timeline.md, accuracy_vs_time_*.png")
        elif args.command == "plot":
            from hosfl.metrics.plots import plot_runs

            folders, labels = zip(*map(_labelled, args.run_folders), strict=True)
            for path in plot_runs(list(folders), args.out, list(labels)):
                print(f"written: {path}")
        elif args.command == "replay":
            from hosfl.replay import replay_run

            report = replay_run(args.run_folder, args.legacy)
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
