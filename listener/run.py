"""``barnum run``: the relay and the shim in one process, one event loop.

The relay owns SIGINT/SIGTERM (it stops claiming and lets in-flight work
finish within its grace period); its stop also stops the shim.  If either
part ends on its own (the shim cannot bind its port, the relay loses its
database for good), the other is stopped too and the exit status says so.

Options: the relay's delivery options, ``--host``/``--port`` of the shim and
``--metrics-port`` (the shim serves ``/metrics`` too; this also serves them
on a loopback port of their own, like ``barnum relay``).  ``--once`` and
``--processes`` belong to ``barnum relay`` only and are refused here rather
than ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from listener import logs, metrics, relay, relay_cli, shim
from listener.relay_cli import event_loop_runner
from listener.config import Config


class _Refused(argparse.Action):
    """An option ``barnum run`` does not have but a user may expect from
    ``barnum relay``: using it is a usage error (exit 2) saying what to do."""

    def __init__(self, option_strings: list[str], dest: str, *, advice: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.advice = advice

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error(f"{option_string} is not supported by `barnum run`: {self.advice}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    relay_cli.add_delivery_arguments(parser)
    relay_cli.add_metrics_port(parser)
    parser.add_argument("--once", action=_Refused, nargs=0, default=argparse.SUPPRESS,
                        advice="use `barnum relay --once` to deliver what is due and exit",
                        help=argparse.SUPPRESS)
    parser.add_argument("--processes", action=_Refused, metavar="N", default=argparse.SUPPRESS,
                        advice="`barnum run` is one process (relay + shim); for more relay processes "
                               "run `barnum relay --processes N` beside `barnum shim`",
                        help=argparse.SUPPRESS)
    parser.add_argument("--host", default=None, help="shim address (default: $BARNUM_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="shim port (default: $BARNUM_PORT or 8000)")


async def run_together(
    config: Config,
    options: relay.Options,
    host: str,
    port: int,
    *,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    queue_gauges: bool = False,
) -> int:
    """Serve the shim and run the relay until a signal (or one of them ends);
    ``queue_gauges``: the relay's sweeps refresh the queue gauges."""
    stop = asyncio.Event()
    ready = asyncio.Event()
    the_relay = relay.Relay(config, options)
    the_relay.queue_gauges = queue_gauges
    the_relay.on_signal = lambda _signum: stop.set()
    app = shim.create_app(config)

    shim_task = asyncio.create_task(shim.serve(app, host, port, ready, stop=stop))
    ready_task = asyncio.create_task(ready.wait())
    first: list[asyncio.Task[Any]] = [shim_task, ready_task]
    done, _ = await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if shim_task in done:  # it never listened
        ready_task.cancel()
        try:
            shim_task.result()
        except shim.ShimStartError as exc:
            print(f"barnum run: {exc}", file=sys.stderr)
        return 1
    # A Ctrl-C between "ready" (the banner) and the relay installing its own
    # handlers (which replace these) must stop both gracefully, not kill the
    # process (exit 130).
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, the_relay.request_stop, int(sig))
    if on_ready is not None:
        await on_ready()

    relay_task = asyncio.create_task(the_relay.run())
    both: list[asyncio.Task[Any]] = [shim_task, relay_task]
    done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if relay_task not in done:  # the shim ended first: stop the relay too
        the_relay.request_stop()
        code = 1
    stop.set()
    relay_code = await relay_task
    with contextlib.suppress(shim.ShimStartError):
        await shim_task
    return code or relay_code


def main(args: argparse.Namespace, config: Config) -> int:
    config.require("DATABASE_URL", "WEBHOOK_SECRET")
    logs.setup(config.log_level)
    host = args.host or config.host
    port = args.port if args.port is not None else config.port
    options = relay.Options.from_args(args)
    metrics_port: int | None = args.metrics_port
    stop_metrics: Callable[[], None] | None = None
    if metrics_port is not None:
        stop_metrics = metrics.serve_for("run", metrics_port)
        if stop_metrics is None:
            return 1
    try:
        with event_loop_runner() as runner:
            return runner.run(run_together(config, options, host, port, queue_gauges=metrics_port is not None))
    finally:
        if stop_metrics is not None:
            stop_metrics()
