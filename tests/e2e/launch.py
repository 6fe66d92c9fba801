"""Start Barnum's relay or shim the way this checkout offers it.

    python -m tests.e2e.launch relay|shim

Prefers the ``barnum relay`` / ``barnum shim`` subcommands of listener.cli
(SPEC §6); falls back to the modules' own entry points while the CLI does not
have them yet (``listener.relay_cli._cli``; ``listener.shim.main``). Configuration
comes from the environment (DATABASE_URL, WEBHOOK_SECRET, BARNUM_PORT, …).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("relay", "shim"):
        print("usage: python -m tests.e2e.launch relay|shim", file=sys.stderr)
        return 2
    what = argv[0]
    from listener import cli

    if what in cli.COMMANDS:
        return cli.main([what])
    from listener.config import ConfigError, load

    if what == "relay":
        from listener import relay_cli

        return relay_cli._cli([])
    from listener import shim

    parser = argparse.ArgumentParser(prog="barnum shim")
    shim.add_arguments(parser)
    try:
        return shim.main(parser.parse_args([]), load())
    except ConfigError as exc:
        print(f"barnum shim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
