"""``kdforge`` command line. It only parses and calls: every sub-command lives in
``kdforge/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "kdforge.commands.train",
    "eval": "kdforge.commands.eval",
    "select": "kdforge.commands.select",
    "kdep-svd": "kdforge.commands.kdep_svd",
    "data": "kdforge.commands.data",
    "export": "kdforge.commands.export",
    "demo": "kdforge.commands.demo",
    "transfer": "kdforge.commands.transfer",
}


def build_parser() -> argparse.ArgumentParser:
    from kdforge import __version__
    from kdforge.methods import available_methods
    parser = argparse.ArgumentParser(
        prog="kdforge",
        description="Distil big vision models into strong small ones: train ("
                    + ", ".join(available_methods()) + "), evaluate (few-shot, kNN, linear, retrieval, "
                    "geometry, transfer, t-SNE), select wild data, export weights.",
        epilog="Start with 'kdforge demo' or 'kdforge data digits runs/digits && kdforge train "
               "configs/supervised/digits_cpu.yaml'. 'kdforge COMMAND --help' explains each command.")
    parser.add_argument("--version", action="version", version=f"kdforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # a command not part of this build
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from kdforge.config import ConfigError
    from kdforge.engine.trainer import NonFiniteLossError, TrainingInterrupted
    from kdforge.models.checkpoint import CheckpointMismatchError
    try:
        return int(args._run(args) or 0)
    except (ConfigError, NonFiniteLossError, CheckpointMismatchError, FileNotFoundError) as e:
        print(f"kdforge: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"kdforge: {e}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
