"""The command table: each `cocoshard` command's configuration class and the module that runs it.

The CLI builds its sub-commands from this table and the demo runs the other commands through it,
so no command module imports another (modules are imported by name, when the command runs).
"""

from __future__ import annotations

import importlib
from typing import Any

from cocoshard import config, config_scoring

# command -> (config class, module whose run(cfg) does the work)
COMMANDS: dict[str, tuple[type, str]] = {
    "synth": (config.SynthConfig, "cocoshard.prepare.synth"),
    "pack": (config.PackConfig, "cocoshard.prepare.pack"),
    "inspect": (config.InspectConfig, "cocoshard.prepare.inspect"),
    "train": (config.TrainConfig, "cocoshard.training.train"),
    "predict": (config_scoring.PredictConfig, "cocoshard.scoring.predict"),
    "evaluate": (config_scoring.EvaluateConfig, "cocoshard.scoring.evaluate"),
    "thresholds": (config_scoring.ThresholdsConfig, "cocoshard.scoring.thresholds"),
    "ensemble": (config_scoring.EnsembleConfig, "cocoshard.scoring.ensemble"),
    "demo": (config.DemoConfig, "cocoshard.demo"),
    "info": (config.InfoConfig, "cocoshard.info"),
}


def command_module(name: str) -> Any:
    """The module of command `name` (imported now: commands load torch only when they run)."""
    return importlib.import_module(COMMANDS[name][1])


def run_command(name: str, cfg: Any) -> int:
    """Run command `name` with its resolved configuration; returns its exit code."""
    if not isinstance(cfg, COMMANDS[name][0]):
        raise TypeError(f"{name} takes a {COMMANDS[name][0].__name__}, not a {type(cfg).__name__}")
    return int(command_module(name).run(cfg) or 0)
