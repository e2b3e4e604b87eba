"""``edgeops-hil``: the hardware-in-the-loop rig's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from device_agent._version import __version__

PROG = "edgeops-hil"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="EdgeOps hardware-in-the-loop rig: runs test plans against boards "
        "(physical over serial, or emulated in QEMU) and the device agent, injects faults, "
        "and writes reports.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("version", help="print the rig's version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"{PROG} {__version__}")
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
