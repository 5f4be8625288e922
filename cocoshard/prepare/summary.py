"""A manifest as a person reads it: splits, sizes, class frequencies, what was left out.

`cocoshard pack` prints it after packing and `cocoshard inspect` before verifying; it reads only the
manifest, never the shards.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cocoshard.console import literal
from cocoshard.prepare.manifest import labelled_splits
from cocoshard.pure.format import MEMBER_LAYOUT

HEAD_TAIL = 5
SHOWN_REJECTIONS = 10


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB"


def _split_table(manifest: dict[str, Any], title: str) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title) if title else None, title_justify="left")
    for column in ("split", "samples", "shards", "size", "pixels", "empty labels"):
        table.add_column(column, justify="left" if column in ("split", "pixels") else "right")
    for split in (*labelled_splits(manifest), "test"):
        entry = manifest["splits"].get(split, {})
        fields = ", ".join(f"{count} {name}" for name, count in entry.get("fields", {}).items())
        empty = entry.get("empty_labels")
        table.add_row(
            split,
            f"{entry.get('samples', 0):,}",
            str(len(entry.get("shards", []))),
            _megabytes(entry.get("bytes", 0)),
            fields or "-",
            "-" if empty is None else str(empty),
        )
    return table


def class_frequency_lines(manifest: dict[str, Any]) -> list[str]:
    """The most and least frequent classes over the labelled splits, as 'name (id): count' strings."""
    splits = manifest["splits"]
    counts = np.sum([splits[s]["class_counts"] for s in labelled_splits(manifest) if s in splits], axis=0)
    names = manifest.get("classes") or [str(i) for i in range(len(counts))]
    order = np.argsort(-counts, kind="stable")
    describe = lambda ids: ", ".join(f"{names[i]} ({i}): {counts[i]:,}" for i in ids)  # noqa: E731
    return [
        f"most frequent: {describe(order[:HEAD_TAIL])}",
        f"least frequent: {describe(order[::-1][:HEAD_TAIL])}",
    ]


def member_layout_table(pixel_format: str) -> Any:
    """The members of one sample in shards of `pixel_format`, with what each holds."""
    from rich.table import Table

    table = Table(title="members of a sample (WebDataset: the key, then the extension)", title_justify="left")
    table.add_column("member")
    table.add_column("holds")
    for name, formats, holds in MEMBER_LAYOUT:
        if formats in (pixel_format, "both"):
            table.add_row(name, holds)
    return table


def print_summary(manifest: dict[str, Any], console: Any, title: str = "", layout: bool = False) -> None:
    """A table of the splits, then class frequency head and tail, then what was left out; with
    `layout`, the members of a sample too."""
    how = f"{manifest['folds']} folds" if manifest.get("folds") else f"val {manifest.get('val_fraction')}"
    console.print(
        f"format [bold]{literal(manifest['pixel_format'])}[/] (shard format {manifest['format_version']}), "
        f"images up to {manifest['size']} px, split {literal(manifest['split_method'])} "
        f"({how}, seed {manifest['seed']}), {literal(manifest['created_by'])}"
    )
    console.print(_split_table(manifest, title))
    if layout:
        console.print(member_layout_table(manifest["pixel_format"]))
    for line in class_frequency_lines(manifest):
        console.print(literal(line))
    for key, what in (
        ("unlabelled_images", "images without a .cls file (not training samples)"),
        ("deduplicated_labels", ".cls files listing a class twice (deduplicated)"),
    ):
        if manifest.get(key, {}).get("count"):
            console.print(f"{manifest[key]['count']} {what}")
    rejected = manifest.get("rejected", [])
    if rejected:
        console.print(
            f"[bold yellow]warning:[/] {len(rejected)} input files rejected (all listed in the manifest):"
        )
        for item in rejected[:SHOWN_REJECTIONS]:
            console.print(f"  {literal(item['path'])}: {literal(item['reason'])}")
        if len(rejected) > SHOWN_REJECTIONS:
            console.print(f"  ... and {len(rejected) - SHOWN_REJECTIONS} more")
