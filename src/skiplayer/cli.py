"""`skiplayer` command line: one entry point, subcommands. Bad input prints one line, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from skiplayer.errors import UserError

# name -> module providing add_arguments(parser) and run(args) -> int exit code
COMMANDS = {
    "generate": ("skiplayer.commands.generate", "generate text (streams; interactive without --prompt)"),
    "train": ("skiplayer.commands.train", "LayerSkip training: layer dropout + early-exit loss, checkpoints, resume"),
    "benchmark": ("skiplayer.commands.benchmark",
                  "measure a strategy (and autoregressive side by side) on a dataset: speedup, acceptance, metrics"),
    "sweep": ("skiplayer.commands.sweep", "grid over exit layer / speculations / mode / skip proportion"),
    "correctness": ("skiplayer.commands.correctness",
                    "check greedy self-speculative output equals autoregressive (exit 1 on a mismatch)"),
    "report": ("skiplayer.commands.report", "plots and a markdown table from benchmark / sweep run directories"),
    "calibrate": ("skiplayer.commands.calibrate", "self-distil early-exit draft adapters + a reduced draft vocabulary (--draft)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skiplayer", description="Lossless self-speculative decoding (LayerSkip)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        print(f"skiplayer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written (e.g. --output_dir under a file): one line too
        where = f" {e.filename}" if e.filename else ""
        print(f"skiplayer {args.command}: error: cannot use{where}: {e.strerror or e}; check the path and its "
              f"permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
