"""The report: figures that open as images, a summary that links them, a defensive log reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocoshard.pure import metrics
from cocoshard.scoring import report


@pytest.fixture(scope="module")
def evaluation() -> tuple[dict, metrics.ServerF1, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.random((400, 80)) < np.geomspace(0.5, 0.004, 80)
    labels[:, 79] = False  # one class absent: drawn grey, weight 0
    scores = 1 / (1 + np.exp(-(rng.normal(size=labels.shape) + 3 * labels - 2)))
    server = metrics.server_f1(scores > 0.5, labels)
    return metrics.metrics_from_scores(scores, labels), server, metrics.average_precision(scores, labels)


def write_log(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / report.METRICS_LOG).write_text("\n".join(lines) + "\n")
    return folder


def test_metrics_log_is_read_defensively(tmp_path: Path) -> None:
    run = write_log(
        tmp_path / "run",
        [
            json.dumps(
                {
                    "epoch": 1,
                    "train_loss": 0.9,
                    "val": {"server_f1": 0.2, "loss": 1.1},
                    "note": "warm-up",
                    "ok": True,
                }
            ),
            "[1, 2, 3]",
            json.dumps(
                {"epoch": 2, "train_loss": 0.5, "val": {"server_f1": 0.4, "loss": 0.8}, "lr": float("nan")}
            ),
            '{"epoch": 3, "train_lo',  # a record cut short by a killed run
        ],
    )
    records = report.read_metrics_log(run)
    assert records == [
        {"epoch": 1.0, "train_loss": 0.9, "val/server_f1": 0.2, "val/loss": 1.1},
        {"epoch": 2.0, "train_loss": 0.5, "val/server_f1": 0.4, "val/loss": 0.8},
    ]
    assert report.read_metrics_log(tmp_path / "absent") == []


def test_curves_keep_losses_and_headline_scores_of_a_trainer_log() -> None:
    record = {
        "epoch": 1.0,
        "lr": 0.1,
        "train/loss": 0.7,
        "train/server_f1": 0.3,
        "train/macro_f1": 0.4,
        "val/ema/loss": 0.6,
        "val/ema/server_f1": 0.35,
        "val/ema/server_f1_tuned": 0.45,
        "val/ema/macro_f1": 0.5,
        "val/ema/map": 0.6,
        "val/ema/heldout_gain": 0.05,
    }
    losses, scores = report.curve_series([record, {**record, "epoch": 2.0}])
    assert set(losses) == {"train/loss", "val/ema/loss"}
    assert set(scores) == {"train/server_f1", "val/ema/server_f1", "val/ema/server_f1_tuned", "val/ema/map"}
    assert scores["val/ema/map"] == ([1.0, 2.0], [0.6, 0.6])
    _, fallback = report.curve_series([{"epoch": 1.0, "f1_macro": 0.2}])
    assert set(fallback) == {"f1_macro"}


def test_curves_need_a_loss_or_a_score(tmp_path: Path) -> None:
    assert report.plot_curves([{"epoch": 1.0, "lr": 0.1}], tmp_path / "c.png", "t") is None
    records = [{"epoch": float(e), "train_loss": 1 / e, "val/server_f1": e / 10} for e in range(1, 6)]
    path = report.plot_curves(records, tmp_path / "c.png", "t")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600


def test_classes_are_ordered_by_frequency_with_ties_by_id() -> None:
    assert report.frequency_order(np.array([3, 10, 3, 0, 10])).tolist() == [1, 4, 0, 2, 3]


def test_write_report_makes_every_figure_and_links_them(tmp_path: Path, evaluation) -> None:
    result, server, ap = evaluation
    run = write_log(
        tmp_path / "run", [json.dumps({"epoch": e, "loss": 1 / e, "server_f1": e / 10}) for e in (1, 2, 3)]
    )
    paths = report.write_report(
        tmp_path / "out", result, server, average_precision=ap, run_dir=run, title="val"
    )
    assert [p.name for p in paths] == ["summary.md", "per_class_f1.png", "precision_recall.png", "curves.png"]
    for png in paths[1:]:
        with Image.open(png) as image:
            assert image.format == "PNG"
            assert image.height > 800 or png.name == "curves.png"  # 80 readable class rows
    summary = paths[0].read_text()
    assert re.search(rf"\| server_f1 \| {result['server_f1']:.4f} \|", summary)
    for png in paths[1:]:
        assert f"]({png.name})" in summary
    assert "Where the server F1 is lost" in summary
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_report_without_a_run_has_no_curves(tmp_path: Path, evaluation) -> None:
    result, server, _ = evaluation
    paths = report.write_report(tmp_path / "out", result, server, run_dir=tmp_path / "no-run")
    assert "curves.png" not in {p.name for p in paths}
