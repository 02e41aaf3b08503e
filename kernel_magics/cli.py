"""The ``kernel-magics`` command line (thin: each command calls the core)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernel-magics",
        description="Turn notebook cells into a deployable Truss model. In a notebook: %load_ext kernel_magics.",
    )
    parser.add_argument("--version", action="version", version=f"kernel-magics {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("check-config", help="Validate a config.yaml against the Truss schema.")
    check.add_argument("path", help="Path to config.yaml.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "check-config":
        from .config import parse_config
        from .errors import KernelMagicsError

        try:
            with open(args.path, encoding="utf-8") as f:
                text = f.read()
            config = parse_config(text, source=args.path)
        except OSError as exc:
            print(f"error: cannot read {args.path}: {exc.strerror}.", file=sys.stderr)
            return 2
        except KernelMagicsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"OK {args.path}: model {config.model_name or '(unnamed)'}, class {config.model_class_name}.")
        return 0
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
