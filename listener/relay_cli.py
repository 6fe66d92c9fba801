"""``barnum relay``'s command line: its options, and ``main`` running one
relay (:class:`listener.relay.Relay`) or, with ``--processes N``, the
supervisor of N (:mod:`listener.supervisor`).  ``python -m listener.relay``
lands here too.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from listener import logs, metrics, supervisor
from listener.config import Config, ConfigError, load
from listener.relay import Options, Relay


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value

    return parse


def add_delivery_arguments(parser: argparse.ArgumentParser) -> None:
    """The delivery options shared by ``barnum relay`` and ``barnum run``."""
    parser.add_argument("--concurrency", type=_bounded(int, 1, 10000), default=32,
                        help="HTTP requests in flight per process (default 32)")
    parser.add_argument("--batch", type=_bounded(int, 1, 10000), default=50,
                        help="deliveries claimed per round trip (default 50)")
    parser.add_argument("--sweep-interval", type=_bounded(float, 0.05, 86400), default=5.0,
                        metavar="SECONDS",
                        help="seconds between sweeps: tick() and a LISTEN health check (default 5)")
    parser.add_argument("--grace", type=_bounded(float, 0, 3600), default=10.0, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, seconds to let in-flight requests finish (default 10)")
    parser.add_argument("--lease", type=_bounded(float, 1, 3600), default=60.0, metavar="SECONDS",
                        help="claim lease; a crashed relay's rows are reclaimed after it (default 60)")
    parser.add_argument("--batches-in-flight", type=_bounded(int, 1, 16), default=2, metavar="N",
                        help="window: up to N × --batch deliveries claimed and not yet recorded (default 2)")


def add_metrics_port(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=_bounded(int, 1, 65535), default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``barnum relay``."""
    parser.add_argument("--once", action="store_true",
                        help="process everything due, print a JSON summary and exit")
    add_delivery_arguments(parser)
    parser.add_argument("--processes", type=_bounded(int, 1, 256), default=1, metavar="N",
                        help="relay processes to run (one per core uses a multi-core box; default 1); "
                             "with N > 1 this process supervises N children")
    add_metrics_port(parser)
    # Set by the --processes supervisor on its children when it serves their
    # metrics: refresh the queue gauges on every sweep (no port of their own).
    parser.add_argument(supervisor.QUEUE_GAUGES_FLAG, action="store_true", help=argparse.SUPPRESS)


def event_loop_runner() -> asyncio.Runner:
    """An asyncio runner on uvloop (shipped with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _run_relay(config: Config, options: Options, *, once: bool,
               metrics_port: int | None = None, queue_gauges: bool = False) -> int:
    stop_metrics: Callable[[], None] | None = None
    if metrics_port is not None:
        stop_metrics = metrics.serve_for("relay", metrics_port)
        if stop_metrics is None:
            return 1

    async def go() -> int:
        relay = Relay(config, options)
        relay.queue_gauges = queue_gauges or metrics_port is not None
        return await relay.run(once=once)

    try:
        with event_loop_runner() as runner:
            return runner.run(go())
    finally:
        if stop_metrics is not None:
            stop_metrics()


def main(args: argparse.Namespace, config: Config) -> int:
    """``barnum relay``: run the relay (``--processes`` N of them); exit status.

    Raises :class:`ConfigError` for a missing ``DATABASE_URL`` or
    ``WEBHOOK_SECRET`` (the CLI prints it on one line and exits 2).
    """
    config.require("DATABASE_URL", "WEBHOOK_SECRET")
    options = Options.from_args(args)
    logs.setup(config.log_level)
    if getattr(args, "processes", 1) > 1:
        return supervisor.run_processes(args, options)
    return _run_relay(config, options, once=args.once, metrics_port=getattr(args, "metrics_port", None),
                      queue_gauges=getattr(args, "queue_gauges", False))


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="barnum relay", description="Deliver the outbox to webhook endpoints.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args, load())
    except ConfigError as exc:
        print(f"barnum relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


__all__ = ["add_arguments", "add_delivery_arguments", "add_metrics_port", "event_loop_runner", "main"]

if __name__ == "__main__":
    sys.exit(_cli())
