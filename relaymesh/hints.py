"""How to run ``relaymesh`` again from the user's shell, for the hints we print.

After ``python3 -m venv .venv && .venv/bin/pip install -e .`` the command is
``.venv/bin/relaymesh``, not on PATH: a hint that says ``relaymesh listen``
would fail when pasted. Hints therefore name the program as the user can run
it: ``relaymesh`` when that is what PATH finds, else its path (relative to the
working directory when it is below it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

__all__ = ["command_name"]


def command_name() -> str:
    script = Path(sys.argv[0])
    if script.name != "relaymesh":
        # python -m relaymesh.cli: the script beside the interpreter, if installed.
        script = Path(sys.executable).parent / "relaymesh"
        if not script.exists():
            return f"{shlex.quote(sys.executable)} -m relaymesh.cli"
    on_path = shutil.which("relaymesh")
    if on_path is not None and _same(Path(on_path), script):
        return "relaymesh"
    absolute = Path(os.path.abspath(script))
    try:
        shown = "./" + str(absolute.relative_to(Path.cwd()))
    except ValueError:
        shown = str(absolute)
    return shlex.quote(shown.removeprefix("./") if shown.startswith("./.") else shown)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
