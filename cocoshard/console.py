"""Screen output: rich consoles that never reinterpret what the user gave (file names, keys, paths).

rich reads `[...]` as markup, so a file named `bad[red]x.jpg` would print as `badx.jpg` and a path
holding `[/]` would crash the print. Every message built from user-supplied text goes through
`literal()` (or is a `rich.text.Text`); styles come only from the template around it.

    console = stderr_console()
    console.print(f"[bold red]error:[/] {literal(path)} is not a folder")
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape


def literal(value: object) -> str:
    """`value` as text that rich prints exactly as it is (markup characters escaped)."""
    return escape(str(value))


def stderr_console() -> Console:
    """A console for progress, notes and errors: stderr, no highlighting, long lines not cut."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


# Piped output has no width; rich would assume 80 columns and cut table cells (class names) short.
PIPED_WIDTH = 200


def stdout_console() -> Console:
    """A console for results a user may pipe: stdout, no highlighting, long lines and tables not cut."""
    width = None if sys.stdout.isatty() else PIPED_WIDTH
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width)
