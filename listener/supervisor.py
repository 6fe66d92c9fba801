"""The ``barnum relay --processes N`` supervisor: N relay children, each a
full relay (``python -m listener.relay``); this process only watches them,
forwards signals and, with ``--metrics-port``, serves their summed metrics
from a private prometheus-client multiprocess directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from listener import logs, metrics
from listener.relay import Options

log = logging.getLogger("barnum.relay")

#: Hidden option of --processes children (see relay_cli.add_arguments).
QUEUE_GAUGES_FLAG = "--queue-gauges"
#: How often the supervisor looks at its children (seconds).
SUPERVISE_POLL = 0.1


def _child_argv(args: argparse.Namespace, *, queue_gauges: bool) -> list[str]:
    argv = [
        sys.executable, "-m", "listener.relay",
        "--concurrency", str(args.concurrency), "--batch", str(args.batch),
        "--sweep-interval", str(args.sweep_interval), "--grace", str(args.grace),
        "--lease", str(args.lease), "--batches-in-flight", str(getattr(args, "batches_in_flight", 2)),
        "--processes", "1",
    ]
    if args.once:
        argv.append("--once")
    if queue_gauges:
        argv.append(QUEUE_GAUGES_FLAG)
    return argv


def _die_with_parent() -> None:
    """In a child: get SIGTERM if the parent dies (even by SIGKILL), on Linux."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover — not Linux
        pass


def run_processes(args: argparse.Namespace, options: Options) -> int:
    """``--processes N``: N relay children, each a full relay; this process
    only supervises them.

    * SIGTERM/SIGINT are forwarded (the children are in their own process
      group, so a terminal's Ctrl-C reaches them once, through us); a second
      signal is forwarded too and abandons in-flight work, as for one relay.
    * A child that exits on its own (not ``--once``) stops the others and the
      exit status is 1: the service manager restarts the whole relay.
    * ``--metrics-port``: the children write prometheus-client multiprocess
      files to a fresh private directory, this process serves their sum and
      removes the directory at exit (a SIGKILL leaves it in the temp dir; the
      children get SIGTERM then, see :func:`_die_with_parent`).
    """
    env = dict(os.environ)
    multiproc_dir: str | None = None
    stop_metrics: Callable[[], None] | None = None
    if args.metrics_port is not None:
        multiproc_dir = tempfile.mkdtemp(prefix="barnum-relay-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
        stop_metrics = metrics.serve_for("relay", args.metrics_port, metrics.multiprocess_registry(multiproc_dir))
        if stop_metrics is None:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
            return 1

    children: list[subprocess.Popen[bytes]] = []
    finished: dict[int, int] = {}  # pid → exit status
    stopping = False
    code = 0

    def forward(signum: int) -> None:
        for child in children:
            if child.pid not in finished and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        forward(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        argv = _child_argv(args, queue_gauges=multiproc_dir is not None)
        for _ in range(args.processes):
            if stopping:
                break
            children.append(subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent, process_group=0))
        logs.log(log, logging.INFO, "relay supervisor started", pid=os.getpid(), processes=args.processes,
                 children=[c.pid for c in children], metrics_port=args.metrics_port,
                 metrics_dir=multiproc_dir)
        while len(finished) < len(children):
            for child in children:
                status = child.poll()
                if status is None or child.pid in finished:
                    continue
                finished[child.pid] = status
                if multiproc_dir is not None:
                    metrics.mark_process_dead(child.pid, multiproc_dir)
                if status != 0 and not (stopping and status in (-signal.SIGTERM, -signal.SIGINT)):
                    code = 1
                if not stopping and not args.once:
                    logs.log(log, logging.ERROR, "relay process exited; stopping the others",
                             pid=child.pid, status=status)
                    code = 1
                    stopping = True
                    forward(signal.SIGTERM)
            if len(finished) < len(children):
                time.sleep(SUPERVISE_POLL)  # wait-ok: supervisor poll; signals interrupt it
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        # An exception here (not a signal): don't leave children behind.
        forward(signal.SIGTERM)
        deadline = time.monotonic() + options.grace + 15.0
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if stop_metrics is not None:
            stop_metrics()
        if multiproc_dir is not None:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
    return code
