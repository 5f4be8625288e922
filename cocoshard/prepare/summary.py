"""A manifest as a person reads it: splits, sizes, class frequencies, what was left out.

`cocoshard pack` prints it after packing and `cocoshard inspect` before verifying; it reads only the
manifest, never the shards.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cocoshard.prepare.format import SPLITS

HEAD_TAIL = 5


SHOWN_REJECTIONS = 10


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB"


def _split_table(manifest: dict[str, Any], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title or None, title_justify="left")
    for column in ("split", "samples", "shards", "size", "pixels", "empty labels"):
        table.add_column(column, justify="left" if column in ("split", "pixels") else "right")
    for split in SPLITS:
        entry = manifest["splits"].get(split, {})
        fields = ", ".join(f"{count} {name}" for name, count in entry.get("fields", {}).items())
        empty = entry.get("empty_labels")
        table.add_row(split, f"{entry.get('samples', 0):,}", str(len(entry.get("shards", []))),
                      _megabytes(entry.get("bytes", 0)), fields or "-", "-" if empty is None else str(empty))
    return table


def class_frequency_lines(manifest: dict[str, Any]) -> list[str]:
    """The most and least frequent classes over train + val, as 'name (id): count' strings."""
    splits = manifest["splits"]
    counts = np.sum([splits[s]["class_counts"] for s in ("train", "val") if s in splits], axis=0)
    names = manifest.get("classes") or [str(i) for i in range(len(counts))]
    order = np.argsort(-counts, kind="stable")
    describe = lambda ids: ", ".join(f"{names[i]} ({i}): {counts[i]:,}" for i in ids)  # noqa: E731
    return [f"most frequent: {describe(order[:HEAD_TAIL])}", f"least frequent: {describe(order[::-1][:HEAD_TAIL])}"]


def print_summary(manifest: dict[str, Any], console: Any, title: str = "") -> None:
    """A table of the splits, then class frequency head and tail, then what was left out."""
    console.print(
        f"format [bold]{manifest['pixel_format']}[/], canvas {manifest['size']} px, "
        f"split {manifest['split_method']} (val {manifest['val_fraction']}, seed {manifest['seed']}), "
        f"{manifest['created_by']}", highlight=False,
    )
    console.print(_split_table(manifest, title))
    for line in class_frequency_lines(manifest):
        console.print(line, highlight=False)
    for key, what in (("unlabelled_images", "images without a .cls file (not training samples)"),
                      ("deduplicated_labels", ".cls files listing a class twice (deduplicated)")):
        if manifest.get(key, {}).get("count"):
            console.print(f"{manifest[key]['count']} {what}", highlight=False)
    rejected = manifest.get("rejected", [])
    if rejected:
        console.print(f"[bold yellow]warning:[/] {len(rejected)} input files rejected (all listed in the manifest):", highlight=False)
        for item in rejected[:SHOWN_REJECTIONS]:
            console.print(f"  {item['path']}: {item['reason']}", highlight=False, soft_wrap=True)
        if len(rejected) > SHOWN_REJECTIONS:
            console.print(f"  ... and {len(rejected) - SHOWN_REJECTIONS} more", highlight=False)
