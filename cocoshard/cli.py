"""The command line: each command parses its flags into its config and calls one `run()`.

    $ cocoshard synth --out synthetic --train 4000
    $ cocoshard pack --root ms-coco --out shards --format jpeg
    $ cocoshard inspect --shards shards --verify
    $ cocoshard train --shards shards --model convnext_tiny
    $ torchrun --nproc_per_node=4 -m cocoshard train --shards shards
    $ cocoshard predict --checkpoint runs/train/best.pt --images ms-coco/images/test-resized/test-resized
    $ cocoshard evaluate --predictions predictions.json --labels shards --report report
    $ cocoshard thresholds --scores val-scores.npz --labels shards --out thresholds.json
    $ cocoshard demo

Flags come from the config dataclasses (`cocoshard.config`), in the help groups their fields name
(`group=` in the field's metadata); each command prints its resolved configuration when it starts.
Flags must be spelled out (`--ep` is not `--epochs`); a flag it does not know is named with the
closest one it does ("did you mean --epochs?") and a short usage line, not the whole usage. A
`UserError` ends the command with its message and exit code 2, never a traceback; Ctrl-C, SIGTERM
and SIGHUP (a closed terminal) end it with 130, 143 and 129 after the command has said what it kept.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
import typing
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

from cocoshard.commands import COMMANDS, run_command
from cocoshard.console import literal, stderr_console
from cocoshard.errors import Interrupted, UserError
from cocoshard.settings import fields_of, optional_of, resolve

DESCRIPTION = "Train multi-label image classifiers for the MS COCO classification challenge, fast."
EPILOG = """from the challenge's zip to a submission:
  cocoshard pack --root ms-coco --out shards
  cocoshard train --shards shards --out runs/first
  cocoshard predict --checkpoint runs/first/best.pt --shards shards --out predictions.json
  cocoshard evaluate --predictions predictions.json --images shards

`cocoshard COMMAND --help` lists the flags of a command; `cocoshard demo` runs every step on a
generated data set."""
CONFIG_HELP = (
    "TOML or JSON file of settings (YAML too, with PyYAML installed); a [COMMAND] section holds "
    "one command's own; flags override it"
)
# signals that end a command like Ctrl-C: what schedulers and `timeout` send, and a closed terminal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one short usage line, the error and, for a name it does
    not know, the closest one it does."""

    def error(self, message: str) -> NoReturn:
        message += _choice_hint(message)
        self.exit(2, f"usage: {self.prog} {_usage_tail(self)}\n{self.prog}: error: {message}\n")


def _usage_tail(parser: argparse.ArgumentParser) -> str:
    if parser.prog == "cocoshard":
        return "COMMAND [flags]  (cocoshard --help lists the commands)"
    return f"[flags]  ({parser.prog} --help lists them)"


def _choice_hint(message: str) -> str:
    """ ": did you mean X?" for argparse's "invalid choice: 'Y' (choose from ...)", else ""."""
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not found:
        return ""
    choices = re.findall(r"'?([\w.-]+)'?(?:,|$)", found.group(2))
    close = difflib.get_close_matches(found.group(1), choices, n=1)
    return f": did you mean {close[0]}?" if close else ""


def _flag_help(f: Any) -> str:
    help_text = f.metadata.get("help", "")
    if "(default" not in help_text and "unset" not in help_text and f.default != ():  # some explain theirs
        help_text += f" (default: {f.default})"
    return help_text.replace("%", "%%")


def _add_field(parser: argparse.ArgumentParser | Any, f: Any, kind: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = _flag_help(f)
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
    """One sub-command per entry of COMMANDS, its flags generated from the config fields, in the
    help groups the fields name."""
    parser = _Parser(
        prog="cocoshard",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="store_true", help="print versions (and the PIL in use) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    parser.set_defaults(command_parsers={})
    for name, (cls, _module) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc, description=doc, usage="%(prog)s [flags]", allow_abbrev=False)
        p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
        groups: dict[str, Any] = {}
        for f, kind in fields_of(cls):
            title = f.metadata.get("group")
            target = groups.setdefault(title, p.add_argument_group(title)) if title else p
            _add_field(target, f, kind)
        parser.get_default("command_parsers")[name] = p
    return parser


def _unknown_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """What was not understood, each unknown flag with the closest known one."""
    known = [option for action in parser._actions for option in action.option_strings]
    parts: list[str] = []
    for index, word in enumerate(unknown):
        flag = word.split("=", 1)[0]
        if not flag.startswith("-"):
            if index == 0 or not unknown[index - 1].startswith("-") or "=" in unknown[index - 1]:
                parts.append(f"unexpected argument {word!r}")  # not the value of an unknown flag
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        parts.append(f"unrecognized flag {flag}" + (f": did you mean {close[0]}?" if close else ""))
    return "; ".join(parts)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is named with the closest flag of the command it was given to."""
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        target = ns.command_parsers.get(ns.command, parser)
        target.error(_unknown_message(target, unknown))
    return ns


_MAIN_PID = os.getpid()


def _stop_as_interrupt(signum: int, frame: Any) -> None:
    """In the command's own process a stop signal unwinds it (cleanup runs, a message is printed).
    A forked worker inherits this handler until it installs its own: a signal caught in that window
    ends the worker the default way, not with a traceback from inside its start-up."""
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
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
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    previous = {signum: signal.signal(signum, _stop_as_interrupt) for signum in STOP_SIGNALS}
    try:
        every = {name: command_cls for name, (command_cls, _module) in COMMANDS.items()}
        cfg = resolve(cls, overrides, ns.config, command=ns.command, commands=every)
        return run_command(ns.command, cfg)
    except UserError as exc:
        stderr_console().print(f"[bold red]error:[/] {literal(exc)}")
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
