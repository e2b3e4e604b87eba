"""``python -m edgeops.broker --host H --port P``: the embedded broker, in the foreground.

Prints one ready line on stdout (:data:`edgeops.broker.embedded.READY_PREFIX` and the URL) once
it accepts connections, and stops on SIGTERM or Ctrl-C. Exit codes: 0 after SIGTERM, 130 after
Ctrl-C (both stop cleanly), 1 if the broker cannot start, 2 for bad arguments, 3 if the port
is taken.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from edgeops.broker.embedded import (
    EXIT_ADDRESS_IN_USE,
    READY_PREFIX,
    address_in_use,
    run_embedded_broker,
)
from edgeops.errors import BrokerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgeops.broker",
        description="Run the embedded MQTT broker (amqtt, MQTT 3.1.1, in memory, anonymous) "
        "until SIGTERM or Ctrl-C. For production use Mosquitto with deploy/mosquitto/.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (default 1883)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    ready = threading.Event()

    def announce() -> None:
        ready.wait()
        sys.stdout.write(f"{READY_PREFIX}mqtt://{host}:{args.port}\n")
        sys.stdout.flush()

    threading.Thread(target=announce, name="announce-ready", daemon=True).start()
    try:
        run_embedded_broker(args.host, args.port, ready=ready)
    except BrokerError as exc:
        sys.stderr.write(f"edgeops broker: {exc}\n")
        return EXIT_ADDRESS_IN_USE if address_in_use(exc) else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
