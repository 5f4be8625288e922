"""Scores only on the shards a model was trained on: a re-pack moves images between train and val.

    note = check_trained_on(Trained(identity, split), "shards", manifest, what="runs/x/best.pt",
                            allow=cfg.allow_other_shards)

A checkpoint records the identity of the train and val shards it was trained on
(`manifest.shards_identity`) and how their split was drawn (`manifest.split_record`: pack's seed
and val share); a scores file carries them on. Packed again with another `--seed` into the same
folder, the val split holds images the model learned from, and its score there is inflated (31 of
49 val images, server F1 0.34 against an honest 0.10, in the case that made this check). predict,
evaluate and thresholds therefore compare the identity with the shards they read and refuse a
mismatch, naming what changed; `--allow-other-shards` goes on anyway, says so and records it in
what the command writes. Checkpoints and scores files that record no identity are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cocoshard.errors import UserError
from cocoshard.prepare.manifest import shards_identity, split_record

OVERRIDE = "--allow-other-shards"


class OtherShards(UserError):
    """Scores asked of shards other than the ones the model was trained on."""


@dataclass(frozen=True)
class Trained:
    """Which shards a model was trained on: their identity and how their split was drawn."""

    identity: str | None
    split: dict[str, Any] = field(default_factory=dict)


def what_changed(then: dict[str, Any], now: dict[str, Any]) -> str:
    """Why two packs' train/val shards differ, as far as their manifests tell."""
    if then.get("seed") is not None and now.get("seed") is not None and then["seed"] != now["seed"]:
        return f"split seed changed (packed with --seed {then['seed']} then, --seed {now['seed']} now)"
    if then.get("val_fraction") is not None and then.get("val_fraction") != now.get("val_fraction"):
        return (
            f"val share changed (--val-fraction {then['val_fraction']} then, {now.get('val_fraction')} now)"
        )
    return "re-pack detected (its train/val shards hold other images or other bytes)"


def check_trained_on(
    trained: Trained, shards: str, manifest: dict[str, Any], *, what: str, allow: bool
) -> str | None:
    """None when `shards` are the ones `what` was trained on (or it records none); else raise
    OtherShards naming what changed, or with `allow` return the warning to show and record."""
    if not trained.identity or trained.identity == shards_identity(manifest):
        return None
    reason = what_changed(trained.split, split_record(manifest))
    if allow:
        return (
            f"{what} was trained on other shards than {shards} holds now: {reason}; its scores on "
            f"the val split may be inflated ({OVERRIDE})"
        )
    seed = trained.split.get("seed")
    repack = f"re-pack with --seed {seed}" if "seed" in reason and seed is not None else "re-pack them"
    raise OtherShards(
        f"{what} was trained on other shards than {shards} holds now: {reason}. Images it trained "
        f"on may now be in the val split and would score it higher than it is. Score it on the shards "
        f"it was trained on ({repack} as they were), or give {OVERRIDE} to go on anyway (said on "
        f"screen and recorded in what this command writes)"
    )
