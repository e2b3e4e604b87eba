"""``edgeops-agent``: the device agent's command line.

Argparse on purpose: the agent installs with the ``agent`` extra alone, without Typer.
Errors are printed as one line, ``edgeops-agent: error: ...``, with exit code 2 for bad
configuration or usage and 1 for runtime failures; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from device_agent._version import __version__
from device_agent.config import AgentSettings
from device_agent.errors import AgentError, ConfigError
from device_agent.link import mask_url

PROG = "edgeops-agent"


def _tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"tag {item!r} is not KEY=VALUE")
        tags[key.strip()] = value.strip()
    return tags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="EdgeOps device agent: connects this device to the hub over MQTT, reports "
        "its state and presence, runs its model (and a shadow challenger) on samples from its "
        "source, and sends telemetry windows through an offline buffer.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the agent daemon until SIGTERM/SIGINT",
        description="Run the agent daemon. Settings come from --config (TOML), then "
        "EDGEOPS_AGENT_* variables, then these options (highest precedence). On SIGTERM it "
        "runs the samples in hand, closes the current telemetry window, flushes the offline "
        "buffer while the broker acknowledges, publishes offline presence and disconnects.",
    )
    _config_options(run)
    run.add_argument("--log-json", action="store_true", help="log JSON lines (for journald)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    show = commands.add_parser("config", help="print the effective configuration as JSON")
    _config_options(show)

    commands.add_parser("version", help="print the agent version")
    return parser


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="agent.toml")
    parser.add_argument("--device-id", help="this device's id (MQTT client id and topic level)")
    parser.add_argument("--mqtt-url", help="mqtt://user:pass@host:port or mqtts://...")
    parser.add_argument("--data-dir", type=Path, help="root data dir (default ~/.edgeops)")
    parser.add_argument("--tags", type=_tags, metavar="K=V,...", help="hardware tags to report")
    parser.add_argument(
        "--heartbeat",
        type=float,
        metavar="SECONDS",
        dest="heartbeat_s",
        help="state re-publish interval",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        metavar="DIR",
        help="champion bundle: card.json + model.tflite or model.onnx",
    )
    parser.add_argument(
        "--window-samples", type=int, metavar="N", help="close a telemetry window after N samples"
    )
    parser.add_argument(
        "--window-seconds",
        type=float,
        metavar="SECONDS",
        help="close a telemetry window after this many seconds",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        metavar="PORT",
        help="serve GET /health on 127.0.0.1:PORT (0: any free port)",
    )


def load(args: argparse.Namespace) -> AgentSettings:
    return AgentSettings.load(
        args.config,
        device_id=args.device_id,
        mqtt_url=args.mqtt_url,
        data_dir=args.data_dir,
        hardware=args.tags,
        heartbeat_s=args.heartbeat_s,
        model_dir=args.model_dir,
        window_samples=args.window_samples,
        window_seconds=args.window_seconds,
        health_port=args.health_port,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "version":
            print(f"{PROG} {__version__}")
            return 0
        settings = load(args)
        if args.command == "config":
            shown = settings.model_dump(mode="json")
            shown["mqtt_url"] = settings.endpoint.url
            if shown.get("source"):  # a local-broker source URL may carry a password too
                shown["source"]["url"] = mask_url(shown["source"]["url"])
            print(json.dumps(shown, indent=2, sort_keys=True))
            return 0
        return _run(settings, args.log_level, args.log_json)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(settings: AgentSettings, log_level: str, log_json: bool) -> int:
    from device_agent.daemon import AgentDaemon
    from device_agent.logs import configure_logging

    configure_logging(log_level, json_lines=log_json)
    daemon = AgentDaemon(settings)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        daemon.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return daemon.run()


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
