"""The K-fold recipe against one model and K models on one split, end to end: docs/kfold.md's table.

    $ python tools/kfold_compare.py                   # 4,000 + 2,000 generated images, 64 px, K=5, 10 epochs
    $ python tools/kfold_compare.py --images 2000 --epochs 4 --work /tmp/kfold-quick
    $ python tools/kfold_compare.py --root tests/data/coco-sample --folds 3 --epochs 1   # plumbing

Three ways to a submission, every model the same (`cocoshard_tiny` from scratch, the demo's
settings), trained for the same epochs on (K-1)/K of the labelled images:

    (a) one model on a train/val split (val share 1/K), its thresholds tuned on that split
    (b) K models of a K-fold pack (`pack --folds K`, `train --val-fold i`); `ensemble` tunes the
        thresholds on their out-of-fold scores (every labelled image) and averages their test scores
    (c) K models on the split of (a) (seeds 0 to K-1); `ensemble` tunes on their averaged
        validation scores and averages their test scores

Every step is the real command in a subprocess (its output in WORK/logs/). The table gives each
arm's trainings and time, the server F1 on the images the thresholds were tuned on, the gain of
tuning on a held-out half, how many classes had the 10 positives tuning needs, and the test server
and macro F1 against the answers a generated set keeps (`--root` photos have none: plumbing only).
Then, for the rarest classes, each fold run's own threshold (tuned on its fold) beside the
out-of-fold one. Results also go to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MIN_POSITIVES = 10  # cocoshard thresholds' and ensemble's default: rarer classes keep 0.5
FEWER_POSITIVES = 5  # the second pass: each arm tuned again with --min-positives 5
TRAIN_SECONDS = "tool-train-seconds.txt"
RAREST = 8  # classes shown in the threshold table
# The demo's difficulty (a small network from scratch must learn it on a CPU), with synth's default
# long tail: the rarest of 80 classes in ~1.7% of the images, a few dozen in 4,000.
DIFFICULTY = (
    "--clutter",
    "0",
    "--min-scale",
    "0.25",
    "--max-scale",
    "0.5",
    "--rotation",
    "0",
    "--tail",
    "0.8",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--work", default="kfold-compare", help="folder for data, shards, runs, logs")
    parser.add_argument("--root", help="a challenge folder of real photos instead of a generated set")
    parser.add_argument("--images", type=int, default=4000, help="generated labelled images")
    parser.add_argument("--test", type=int, default=2000, help="generated test images (with answers)")
    parser.add_argument("--size", type=int, default=64, help="image side and training resolution")
    parser.add_argument("--folds", type=int, default=5, help="K: folds, and models in (b) and (c)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per training (1: reproducible)")
    parser.add_argument("--parallel", type=int, default=1, help="trainings run at the same time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the split and the folds")
    return parser.parse_args()


# ----------------------------------------------------------------------------------- running commands


class Steps:
    """Runs `python -m cocoshard ...` steps, each logged to its own file, timed, stopping on failure."""

    def __init__(self, work: Path) -> None:
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, *args: object) -> float:
        started = time.perf_counter()
        log = self.logs / f"{name}.log"
        with open(log, "w") as handle:
            done = subprocess.run(
                [sys.executable, "-m", "cocoshard", *map(str, args)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "160"},
            )
        seconds = time.perf_counter() - started
        self.seconds[name] = seconds
        print(f"  {name:<22} {seconds:7.1f} s", flush=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed (exit {done.returncode}): see {log}")
        return seconds


def train_settings(args: argparse.Namespace) -> list[str]:
    """The demo's model and settings, resident raw shards, the same for every run."""
    return [
        "--model", "cocoshard_tiny", "--weights", "none", "--size", str(args.size), "--epochs",
        str(args.epochs), "--batch-size", "64", "--lr", "1e-2", "--loss", "bce", "--crop-scale-min", "1.0",
        "--no-amp", "--device", "cpu", "--loader", "resident", "--workers", "0", "--threads",
        str(args.threads), "--log-every", "50",
    ]  # fmt: skip


# ----------------------------------------------------------------------------------- the arms


def build(args: argparse.Namespace, work: Path, steps: Steps) -> tuple[Path, Path | None]:
    """The data (generated unless --root), packed twice: a train/val split and K folds."""
    root = Path(args.root) if args.root else work / "data"
    if not args.root:
        steps("synth", "synth", "--out", root, "--train", args.images, "--test", args.test, "--size",
              args.size, "--seed", args.seed, *DIFFICULTY)  # fmt: skip
    size = str(max(args.size, 224) if args.root else args.size)
    common = ["--root", root, "--format", "raw", "--size", size, "--seed", args.seed]
    steps("pack split", "pack", *common, "--out", work / "shards", "--val-fraction", 1 / args.folds)
    steps("pack folds", "pack", *common, "--out", work / "shards-folds", "--folds", args.folds)
    answers = root / "labels/test/test"
    return root, answers if answers.is_dir() else None


def run_arms(args: argparse.Namespace, work: Path, steps: Steps) -> dict[str, list[Path]]:
    """Train every model: K on the split (seeds 0 to K-1; seed 0 is arm a) and one per fold, up to
    --parallel at a time (a run already finished in WORK is kept)."""
    from concurrent.futures import ThreadPoolExecutor

    runs = work / "runs"
    split = [runs / f"split-seed{seed}" for seed in range(args.folds)]
    folds = [runs / f"fold{fold}" for fold in range(args.folds)]
    jobs = [(run, ["--shards", work / "shards", "--seed", seed]) for seed, run in enumerate(split)]
    jobs += [
        (run, ["--shards", work / "shards-folds", "--val-fold", fold, "--seed", 0])
        for fold, run in enumerate(folds)
    ]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        done = {
            run: pool.submit(steps, f"train {run.name}", "train", "--out", run, *extra, *train_settings(args))
            for run, extra in jobs
            if not (run / "best.pt").is_file()
        }
        for run, future in done.items():
            (run / TRAIN_SECONDS).write_text(f"{future.result():.1f}\n")
    return {"a": split[:1], "b": folds, "c": split}


def train_seconds(run: Path) -> float:
    """How long the tool's training of `run` took (kept in the run folder: a rerun reuses the run)."""
    path = run / TRAIN_SECONDS
    return float(path.read_text()) if path.is_file() else float("nan")


def ensemble_and_score(
    arm: str, runs: list[Path], work: Path, answers: Path | None, steps: Steps, *extra: object
) -> dict[str, Any]:
    """`cocoshard ensemble` over the arm's runs, its submission checked strictly and scored."""
    out = work / f"arm-{arm}"
    steps(f"ensemble {arm}", "ensemble", *runs, "--out", out, "--workers", "0", "--device", "cpu", "--no-amp",
          *extra)  # fmt: skip
    shards = json.loads((out / "ensemble.json").read_text())["shards"]
    steps(f"check {arm}", "evaluate", "--predictions", out / "predictions.json", "--images", shards)
    summary = json.loads((out / "ensemble.json").read_text())
    result: dict[str, Any] = {
        "runs": len(runs),
        "train_s": sum(train_seconds(run) for run in runs),
        "val_images": summary["val_images"],
        "val_split": summary["val_split"],
        **summary["figures"],
    }
    if answers is not None:
        steps(f"test {arm}", "evaluate", "--predictions", out / "predictions.json", "--labels", answers,
              "--out", out / "test-metrics.json")  # fmt: skip
        test = json.loads((out / "test-metrics.json").read_text())
        result.update(test_server_f1=test["server_f1"], test_macro_f1=test["macro_f1"], test_map=None)
    return result


# ----------------------------------------------------------------------------------- the figures


def class_counts(shards: Path, splits: list[str]) -> np.ndarray:
    manifest = json.loads((shards / "manifest.json").read_text())
    return np.sum([manifest["splits"][split]["class_counts"] for split in splits], axis=0)


def rare_thresholds(
    args: argparse.Namespace, work: Path, arms: dict[str, list[Path]]
) -> list[dict[str, Any]]:
    """For the rarest classes with the positives to tune on out of fold: positives per fold, each fold
    run's own threshold (tuned on its fold when that has 10 positives, else 0.5), the out-of-fold
    threshold and (a)'s."""
    folds = [f"fold{i}" for i in range(args.folds)]
    per_fold = np.stack([class_counts(work / "shards-folds", [fold]) for fold in folds])
    total = per_fold.sum(axis=0)
    names = json.loads((work / "shards-folds" / "manifest.json").read_text())["classes"]
    own = np.stack([json.loads((run / "thresholds.json").read_text())["thresholds"] for run in arms["b"]])
    oof = np.asarray(json.loads((work / "arm-b" / "thresholds.json").read_text())["thresholds"])
    single = np.asarray(json.loads((work / "arm-a" / "thresholds.json").read_text())["thresholds"])
    rows = []
    tunable = [c for c in np.argsort(total, kind="stable") if total[c] >= MIN_POSITIVES]
    for c in tunable[:RAREST]:  # the rarest classes the out-of-fold scores can tune
        tuned = per_fold[:, c] >= MIN_POSITIVES
        rows.append(
            {
                "class": names[c],
                "images": int(total[c]),
                "positives_per_fold": [int(n) for n in per_fold[:, c]],
                "folds_tuned": int(tuned.sum()),
                "fold_thresholds": [round(float(t), 3) for t in own[:, c]],
                "fold_spread": round(float(own[:, c].max() - own[:, c].min()), 3),
                "out_of_fold": round(float(oof[c]), 3),
                "one_model": round(float(single[c]), 3),
            }
        )
    return rows


def single_models(work: Path, answers: Path) -> dict[str, list[float]]:
    """Test server F1 of each model alone: the split's K seeds with their own thresholds (K draws
    of arm a), and each fold model with the out-of-fold thresholds."""
    from cocoshard.pure import metrics
    from cocoshard.scoring.ground_truth import read_label_folder
    from cocoshard.scoring.scores import read_scores
    from cocoshard.scoring.submission import build_submission, to_matrix

    truth = read_label_folder(answers)
    oof = np.asarray(json.loads((work / "arm-b" / "thresholds.json").read_text())["thresholds"])

    def f1(path: Path, thresholds: np.ndarray | None) -> float:
        found = read_scores(path)
        cut = found.thresholds if thresholds is None else thresholds
        predicted = metrics.predictions_from_scores(found.scores, cut)
        submission = build_submission(found.keys, predicted, found.scores, min_labels=1)
        labels = np.stack([truth[key] for key in found.keys])
        return round(metrics.server_f1(to_matrix(submission, found.keys), labels).f1, 4)

    members = {arm: sorted((work / f"arm-{arm}" / "members").glob("*-test-scores.npz")) for arm in ("b", "c")}
    return {
        "split_models_own_thresholds": [f1(path, None) for path in members["c"]],
        "fold_models_out_of_fold_thresholds": [f1(path, oof) for path in members["b"]],
    }


def threshold_spread(args: argparse.Namespace, work: Path, arms: dict[str, list[Path]]) -> dict[str, float]:
    """Over the rarest quarter of the classes the folds could each tune: the mean, over those
    classes, of the range of the fold runs' thresholds (and the same over the most frequent quarter)."""
    folds = [f"fold{i}" for i in range(args.folds)]
    per_fold = np.stack([class_counts(work / "shards-folds", [fold]) for fold in folds])
    own = np.stack([json.loads((run / "thresholds.json").read_text())["thresholds"] for run in arms["b"]])
    every = [
        c for c in np.argsort(per_fold.sum(axis=0), kind="stable") if (per_fold[:, c] >= MIN_POSITIVES).all()
    ]
    quarter = max(1, len(every) // 4)
    ranges = own.max(axis=0) - own.min(axis=0)
    return {
        "classes_every_fold_tunes": len(every),
        "rare_quarter_mean_range": round(float(ranges[every[:quarter]].mean()), 3) if every else float("nan"),
        "common_quarter_mean_range": round(float(ranges[every[-quarter:]].mean()), 3)
        if every
        else float("nan"),
    }


def machine() -> str:
    model = platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def show(results: dict[str, Any]) -> None:
    print(
        f"\n{results['machine']}; load average {results['load_before']} before, {results['load_after']} after"
    )
    print(f"{results['settings']}\n")
    titles = {"a": "(a) one model, val-tuned thresholds", "b": "(b) K-fold ensemble, out-of-fold thresholds",
              "c": "(c) K models on one split, averaged"}  # fmt: skip
    titles.update({arm + "5": f"{title}, --min-positives {FEWER_POSITIVES}" for arm, title in titles.items()})
    print("| arm | trainings | train time | tuned on | server F1 there | held-out gain | classes tuned "
          "| test server F1 | test macro F1 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for arm, row in results["arms"].items():
        test = (
            f"{row['test_server_f1']:.4f} | {row['test_macro_f1']:.4f}"
            if "test_server_f1" in row
            else "- | -"
        )
        print(
            f"| {titles[arm]} | {row['runs']} | {row['train_s']:.0f} s | {row['val_images']} images "
            f"| {row['server_f1_tuned']:.4f} | {row['heldout_gain']:+.4f} | {row['classes_tuned']} | {test} |"
        )
    for what, values in results.get("single_models", {}).items():
        print(f"\ntest server F1 of each model alone, {what.replace('_', ' ')}: {values}")
    spread = results["threshold_spread"]
    print(
        f"\nthresholds of the {spread['classes_every_fold_tunes']} classes every fold could tune: range "
        f"across the fold runs, mean over the rarest quarter {spread['rare_quarter_mean_range']}, over the "
        f"most frequent quarter {spread['common_quarter_mean_range']}"
    )
    print(
        "\n| class | images | positives per fold | fold runs' own thresholds | spread | out-of-fold | (a) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in results["rare_classes"]:
        print(
            f"| {row['class']} | {row['images']} | {row['positives_per_fold']} | {row['fold_thresholds']} "
            f"({row['folds_tuned']} tuned) | {row['fold_spread']:.3f} | {row['out_of_fold']:.3f} "
            f"| {row['one_model']:.3f} |"
        )


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    steps = Steps(work)
    started = time.perf_counter()
    _, answers = build(args, work, steps)
    arms = run_arms(args, work, steps)
    results: dict[str, Any] = {"arms": {}}
    for arm in ("a", "b", "c"):
        results["arms"][arm] = ensemble_and_score(arm, arms[arm], work, answers, steps)
    for arm in ("a", "b", "c"):  # the same runs and test scores, tuned again with fewer positives
        saved = sorted(
            (work / f"arm-{arm}" / "members").glob("*-test-scores.npz"),
            key=lambda p: int(p.name.split("-")[0]),
        )
        results["arms"][arm + "5"] = ensemble_and_score(
            arm + "5",
            arms[arm],
            work,
            answers,
            steps,
            "--min-positives",
            FEWER_POSITIVES,
            "--test-scores",
            *saved,
        )
    val_counts = {
        "a": class_counts(work / "shards", ["val"]),
        "b": class_counts(work / "shards-folds", [f"fold{i}" for i in range(args.folds)]),
    }
    val_counts["c"] = val_counts["a"]
    for arm, counts in val_counts.items():
        results["arms"][arm]["classes_tuned"] = int((counts >= MIN_POSITIVES).sum())
        results["arms"][arm + "5"]["classes_tuned"] = int((counts >= FEWER_POSITIVES).sum())
    if answers is not None:
        results["single_models"] = single_models(work, answers)
    results.update(
        rare_classes=rare_thresholds(args, work, arms),
        threshold_spread=threshold_spread(args, work, arms),
        machine=machine(),
        load_before=load_before,
        load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        total_s=round(time.perf_counter() - started),
        date=time.strftime("%Y-%m-%d"),
        settings=(
            (
                f"real photos {args.root}"
                if args.root
                else f"{args.images} generated images + {args.test} test"
            )
            + ", "
            f"{args.size} px, K={args.folds}, {args.epochs} epochs per model, cocoshard_tiny from scratch, "
            f"{args.threads} thread(s) per training, {args.parallel} at a time; "
            f"{round(time.perf_counter() - started)} s in all"
        ),
        steps_s={name: round(seconds, 1) for name, seconds in steps.seconds.items()},
    )
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    show(results)


if __name__ == "__main__":
    main()
