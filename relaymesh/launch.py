"""The ``relaymesh`` command's entry point.

It imports the CLI, and with it trio, the relay and the SDK, inside a guard, so that
Ctrl-C while those imports run exits 130 without a traceback, as it does everywhere
later. ``import relaymesh`` loads nothing heavy (its names are loaded on first use),
so the window before this guard is the interpreter's own start-up.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from relaymesh.cli import main as cli_main
    except KeyboardInterrupt:
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
