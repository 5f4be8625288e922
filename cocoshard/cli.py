"""The command line: each command parses flags into its config, prints it, and calls one `run()`.

    $ cocoshard synth --out synthetic --train 4000
    $ cocoshard pack --root ms-coco --out shards --format jpeg
    $ cocoshard inspect --shards shards --verify
    $ cocoshard train --amp --shards shards --model convnext_tiny
    $ torchrun --nproc_per_node=4 -m cocoshard train --shards shards
    $ cocoshard predict --checkpoint runs/train/best.pt --images ms-coco/images/test-resized/test-resized
    $ cocoshard evaluate --predictions predictions.json --labels shards --report report
    $ cocoshard demo
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any, Literal, Sequence

from cocoshard import config
from cocoshard.commands import COMMANDS, run_command
from cocoshard.errors import UserError


def _add_field(parser: argparse.ArgumentParser, f: Any, kind: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if "default" not in help_text:  # some helps explain a default that depends on other settings
        help_text += f" (default: {f.default})"
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
    elif typing.get_origin(kind) is Literal:
        parser.add_argument(flag, choices=args, default=argparse.SUPPRESS, help=help_text)
    else:
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per entry of COMMANDS, its flags generated from the config fields."""
    parser = argparse.ArgumentParser(prog="cocoshard", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--version", action="store_true", help="print versions (and the active PIL) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _module) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc, description=doc)
        p.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings; flags override it")
        for f, kind in config.fields_of(cls):
            _add_field(p, f, kind)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cocoshard` script; returns the process exit code."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from cocoshard.info import version_line

        print(version_line())
        return 0
    if not ns.command:
        parser.print_help()
        return 2
    cls, _module = COMMANDS[ns.command]
    overrides = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "version")}
    try:
        cfg = config.resolve(cls, overrides, ns.config)
        return run_command(ns.command, cfg)
    except UserError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
