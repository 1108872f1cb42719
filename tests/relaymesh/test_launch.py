"""The ``relaymesh`` entry point: cheap to import, and Ctrl-C during the CLI's imports is 130."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import relaymesh

HEAVY = ("trio", "trio_websocket", "wsproto", "httpx", "pydantic", "nacl", "relay", "relaymesh.cli")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_entry_point_imports_nothing_heavy() -> None:
    proc = _run(
        f"""
        import sys
        import relaymesh.launch
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_ctrl_c_while_the_cli_imports_exits_130_quietly() -> None:
    # A finder that raises KeyboardInterrupt when relaymesh.cli is imported: what a
    # SIGINT landing in the middle of the CLI's imports does.
    proc = _run(
        """
        import sys

        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "relaymesh.cli":
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, Interrupt())
        from relaymesh.launch import main
        sys.exit(main())
        """
    )
    assert proc.returncode == 130
    assert proc.stderr == ""


def test_every_public_name_resolves() -> None:
    for name in relaymesh.__all__:
        assert getattr(relaymesh, name) is not None, name
    assert set(relaymesh.__all__) <= set(dir(relaymesh))
