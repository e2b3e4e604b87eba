"""``edgeops-hil``: the hardware-in-the-loop rig's command line.

Exit status: 0 when every step passed (or was skipped with a reason), 1 when a step failed
or erred, 2 for bad usage or a plan that does not validate, 130 when interrupted (Ctrl-C).
Errors are printed as one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from device_agent._version import __version__
from hil.errors import HilError

PROG = "edgeops-hil"

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_EPILOG = """\
PLAN is a path to a YAML plan or the name of a shipped plan (see `edgeops-hil plans`).
The plan format is described in docs/hil.md.

exit status: 0 every step passed (skipped steps, each with its reason, do not fail a run),
1 a step failed or erred, 2 bad usage or an invalid plan, 130 interrupted.

examples:
  edgeops-hil plans
  edgeops-hil validate my-plan.yaml
  edgeops-hil run smoke --report build/hil/smoke
  edgeops-hil run chaos --report build/hil/chaos --seed 7
"""


class _UsageError(HilError):
    """A command line that cannot run (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="EdgeOps hardware-in-the-loop rig: runs test plans against boards "
        "(physical over serial, or emulated in QEMU) and the device agent, injects faults, "
        "and writes reports (junit.xml, report.html, results.json).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    commands.add_parser("version", help="print the rig's version")
    commands.add_parser("plans", help="list the shipped plans")
    validate = commands.add_parser(
        "validate",
        help="check a plan without running it",
        description="Read and validate PLAN; print its boards and steps, or the first error.",
    )
    validate.add_argument("plan", metavar="PLAN", help="a plan file or a shipped plan's name")
    run = commands.add_parser(
        "run",
        help="run a plan and write its reports",
        description="Run PLAN: start a hub, the boards it names, run its steps in order, "
        "and write junit.xml, report.html and results.json into the report directory. "
        "Progress goes to stderr, one line per step.",
    )
    run.add_argument("plan", metavar="PLAN", help="a plan file or a shipped plan's name")
    run.add_argument(
        "--report",
        metavar="DIR",
        type=Path,
        required=True,
        help="directory for junit.xml, report.html and results.json (created if missing)",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for every random choice (fault moments, drawn boards, inputs); "
        "default: the plan's seed",
    )
    run.add_argument(
        "--keep",
        action="store_true",
        help="keep the run's working files (hub, boards' state, logs) in DIR/work",
    )
    return parser


def _plans() -> int:
    from hil.plan import PlanError, load_plan, shipped_plans

    for name, path in shipped_plans().items():
        try:
            description = load_plan(path).description
            summary = description.split(": ")[0].split(". ")[0].rstrip(".")
        except PlanError as exc:
            summary = f"(invalid: {exc})"
        print(f"{name:<18} {summary}")
    return EXIT_PASSED


def _validate(plan_arg: str) -> int:
    from hil.plan import load_plan, resolve_plan

    plan = load_plan(resolve_plan(plan_arg))
    boards = ", ".join(
        f"{spec.name} ({spec.kind}{' x' + str(spec.count) if spec.count > 1 else ''})"
        for spec in plan.boards
    )
    print(f"{plan.source}: valid plan '{plan.name}': {len(plan.steps)} steps; boards: {boards}")
    for step in plan.steps:
        print(f"  {step.index + 1:>2}. {step.name} ({step.action})")
    return EXIT_PASSED


def _run(args: argparse.Namespace) -> int:
    from hil.plan import load_plan, resolve_plan
    from hil.runner import run_plan

    plan = load_plan(resolve_plan(args.plan))
    if args.seed is not None and args.seed < 0:
        raise _UsageError(f"--seed must be >= 0, not {args.seed}")
    if args.report.exists() and not args.report.is_dir():
        raise _UsageError(f"--report {args.report}: not a directory")
    result = run_plan(plan, args.report, seed=args.seed, keep=args.keep)
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PASSED if result.passed else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"{PROG} {__version__}")
            return EXIT_PASSED
        if args.command == "plans":
            return _plans()
        if args.command == "validate":
            return _validate(args.plan)
        return _run(args)
    except HilError as exc:
        from hil.plan import PlanError

        print(f"{PROG}: error: {exc}", file=sys.stderr)
        usage = isinstance(exc, PlanError | _UsageError) or args.command != "run"
        return EXIT_USAGE if usage else EXIT_FAILED
    except OSError as exc:  # the report directory cannot be written, for instance
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run() -> None:
    """Console-script entry point."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`edgeops-hil plans | head -1`): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_PASSED
    sys.exit(code)
