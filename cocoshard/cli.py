"""The command line: each command parses its flags into its config and calls one `run()`.

    $ cocoshard synth --out synthetic --train 4000
    $ cocoshard pack --root ms-coco --out shards --format jpeg
    $ cocoshard inspect --shards shards --verify
    $ cocoshard train --amp --shards shards --model convnext_tiny
    $ torchrun --nproc_per_node=4 -m cocoshard train --shards shards
    $ cocoshard predict --checkpoint runs/train/best.pt --images ms-coco/images/test-resized/test-resized
    $ cocoshard evaluate --predictions predictions.json --labels shards --report report
    $ cocoshard thresholds --scores val-scores.npz --labels shards --out thresholds.json
    $ cocoshard demo

Flags come from the config dataclasses (`cocoshard.config`); each command prints its resolved
configuration when it starts. Flags must be spelled out (`--ep` is not `--epochs`). A
`UserError` ends the command with its message and exit code 2, never a traceback; Ctrl-C and
SIGTERM end it with 130 and 143 after the command has said what it kept.
"""

from __future__ import annotations

import argparse
import signal
import sys
import typing
from collections.abc import Sequence
from typing import Any, Literal

from cocoshard.commands import COMMANDS, run_command
from cocoshard.console import literal, stderr_console
from cocoshard.errors import Interrupted, UserError
from cocoshard.settings import fields_of, optional_of, resolve


def _add_field(parser: argparse.ArgumentParser, f: Any, kind: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if "default" not in help_text and "unset" not in help_text and f.default != ():  # (some explain theirs)
        help_text += f" (default: {f.default})"
    help_text = help_text.replace("%", "%%")
    kind = optional_of(kind) or kind
    args = typing.get_args(kind)
    if f.metadata.get("const") is not None:  # a flag that may stand alone: --resume [PATH]
        parser.add_argument(
            flag,
            nargs="?",
            const=f.metadata["const"],
            default=argparse.SUPPRESS,
            metavar="PATH",
            help=help_text,
        )
    elif kind is bool:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
        )
    elif typing.get_origin(kind) is tuple:  # several values: RUN... (positional) or --flag A B
        name = f.name if f.metadata.get("positional") else flag
        metavar = f.metadata.get("metavar", f.name.upper())
        parser.add_argument(
            name,
            nargs="*" if name == f.name else "+",
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=help_text,
        )
    elif typing.get_origin(kind) is Literal:
        parser.add_argument(flag, choices=args, default=argparse.SUPPRESS, help=help_text)
    else:
        parser.add_argument(
            flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text
        )


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per entry of COMMANDS, its flags generated from the config fields."""
    parser = argparse.ArgumentParser(
        prog="cocoshard", description=(__doc__ or "").split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--version", action="store_true", help="print versions (and the PIL in use) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(command_parsers={})
    for name, (cls, _module) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc, description=doc, allow_abbrev=False)
        p.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings; flags override it")
        for f, kind in fields_of(cls):
            _add_field(p, f, kind)
        parser.get_default("command_parsers")[name] = p
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is reported with the usage of the command it was given to."""
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        target = ns.command_parsers.get(ns.command, parser)
        target.error(f"unrecognized arguments: {' '.join(unknown)}")
    return ns


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cocoshard` script; returns the process exit code."""
    parser = build_parser()
    ns = _parse(parser, argv)
    if ns.version:
        from cocoshard.info import version_line

        print(version_line())
        return 0
    if not ns.command:
        parser.print_help()
        return 2
    cls, _module = COMMANDS[ns.command]
    overrides = {
        k: v for k, v in vars(ns).items() if k not in ("command", "config", "version", "command_parsers")
    }
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # what schedulers and `timeout` send
    try:
        return run_command(ns.command, resolve(cls, overrides, ns.config))
    except UserError as exc:
        stderr_console().print(f"[bold red]error:[/] {literal(exc)}")
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
