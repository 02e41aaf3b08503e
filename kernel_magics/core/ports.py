"""What a port number is, for the CLI's and the magics' ``--port`` (one message for both)."""

from __future__ import annotations

import argparse

__all__ = ["port_number"]


def port_number(text: str) -> int:
    """argparse's type for a TCP port: a number from 0 to 65535 (bind() raises OverflowError past it)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number: give one from 0 to 65535 "
                                         "(0 lets the system pick a free one)")
    return port
