"""The GPU check: what cocoshard does on one CUDA device, measured in one command, within a budget.

    $ python3 tools/device_check.py --wheels .device/wheels      # an offline GPU machine (docs/gpu.md)
    $ tools/device-check --budget 360 --out bench/results/device
    $ tools/device-check --sections cuda-tests,ceiling           # a rerun of some sections
    $ tools/device-check --rehearse-on-cpu                       # every section, tiny, on a CPU

`--wheels DIR` installs the wheels `bash tools/device-wheels` wrote (webdataset and what else such a
machine lacks) with `pip install --no-index` into a private folder, never into the machine's
environment; without it, what does not import is named in one line. Then the sections run in order
(tools/device_sections.py, tools/device_training.py): `pytest -m cuda`, JPEG decoding, the training
step's ceiling, a generated data set sized to the budget, one epoch per loader mode, predict and
evaluate, the loader bench. `--budget SECONDS` (default 420) is shared out by weight: a section gets
its weight's part of what is left when it starts (time an earlier section did not use goes to the
later ones), and one whose share is below what it needs is skipped with the reason. After every
section `device-check.json` and `device-check.md` are rewritten atomically in --out, so a run cut
off at any moment leaves the figures of the sections that finished; `cuda-tests.log` is written
as pytest runs.

Without a CUDA device it says so and exits with status 2 before doing anything (unless
--rehearse-on-cpu). Exit status 1 when a section failed (a failing CUDA test included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
for _folder in (str(TOOLS), str(REPO)):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

from device_env import install_wheels, missing_modules  # noqa: E402
from device_report import markdown  # noqa: E402
from device_sections import Clock, Run, SectionCut, ceilings, cuda_tests, decode_speed  # noqa: E402
from device_training import bench, epochs, make_data, predict_and_evaluate  # noqa: E402

NO_CUDA = 2


@dataclass(frozen=True)
class Section:
    name: str
    weight: float  # its part of the budget
    minimum_s: tuple[float, float]  # (on a GPU, in the CPU rehearsal): less than this, it is skipped
    run: Callable[[Run, dict[str, Any], Clock], None]
    needs: str = ""  # the section whose results it uses


SECTIONS = (
    Section("cuda-tests", 0.30, (20, 5), cuda_tests),
    Section("decode", 0.03, (5, 2), decode_speed),
    Section("ceiling", 0.17, (15, 4), ceilings),
    Section("data", 0.12, (15, 5), make_data),
    Section("epochs", 0.27, (25, 8), epochs, needs="data"),
    Section("predict", 0.03, (8, 3), predict_and_evaluate, needs="epochs"),
    Section("bench", 0.08, (40, 10), bench),
)


def share_of(left_s: float, weights: dict[str, float], name: str, current: str) -> float:
    """`name`'s part of `left_s` seconds when the sections from `current` on (in `weights`' order) are
    still to run: its weight over theirs."""
    names = list(weights)
    remaining = names[names.index(current) :]
    return left_s * weights[name] / sum(weights[n] for n in remaining)


class Budget:
    """The check's seconds, shared out by weight among the sections still to run."""

    def __init__(self, seconds: float, weights: dict[str, float]) -> None:
        self.seconds, self.weights, self.started = seconds, weights, time.monotonic()
        self.current = next(iter(weights), "")

    def left(self) -> float:
        return max(0.0, self.seconds - (time.monotonic() - self.started))

    def share(self, name: str) -> float:
        """`name`'s share if every section from the current one on uses exactly its own."""
        return share_of(self.left(), self.weights, name, self.current)


# ------------------------------------------------------------------------------------ settings


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/device-check", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--out",
        default=str(REPO / "bench" / "results" / "device"),
        help="folder for the results (%(default)s)",
    )
    add("--work", default=None, help="folder for the generated data and runs (default: a temporary one)")
    add(
        "--wheels", default=None, help="install the wheels of this folder offline first (tools/device-wheels)"
    )
    add("--budget", type=float, default=420, help="seconds for all sections together (default: %(default)s)")
    add("--sections", default=",".join(s.name for s in SECTIONS), help="the sections to run (default: all)")
    add(
        "--max-train",
        type=int,
        default=52_000,
        help="the most train images to generate (default: %(default)s)",
    )
    add("--batch-size", type=int, default=256, help="images per step (default: %(default)s)")
    add("--peers", action=argparse.BooleanOptionalAction, default=True, help="bench the installed peers too")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="also measure torch.compile")
    add(
        "--rehearse-on-cpu", action="store_true", help="every section, tiny, on a CPU: proves the script runs"
    )
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - {s.name for s in SECTIONS}
    if unknown:
        parser.error(
            f"--sections: no section {', '.join(sorted(unknown))} ({', '.join(s.name for s in SECTIONS)})"
        )
    if args.rehearse_on_cpu:
        args.batch_size, args.compile = 16, False
    return args


# ------------------------------------------------------------------------------------ the run


def machine() -> dict[str, Any]:
    import torch

    from cocoshard.info import pil_build
    from cocoshard.loading.image_backend import BACKEND
    from cocoshard.machine import usable_cores

    found: dict[str, Any] = {
        "cpu_cores": usable_cores(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "pil": pil_build().describe(), "image_backend": BACKEND.describe(),
    }  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported(),
        )  # fmt: skip
    return found


def write(results: dict[str, Any], out: Path) -> None:
    """device-check.json and device-check.md, each replaced atomically."""
    from cocoshard.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "device-check.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "device-check.md", markdown(results))


def run_section(section: Section, run: Run, budget: Budget, results: dict[str, Any], out: Path) -> None:
    """One section within its share, its figures written before and after it runs."""
    budget.current = section.name
    share = budget.share(section.name)
    found: dict[str, Any] = {"share_s": round(share), "status": "running"}
    results["sections"][section.name] = found
    write(results, out)
    print(f"== {section.name} (share {share:.0f} s of {budget.left():.0f} s left)", flush=True)
    minimum = section.minimum_s[run.cpu]
    needed = results["sections"].get(section.needs, {})
    started = time.perf_counter()
    if section.needs and (
        section.needs not in results["sections"] or "error" in needed or "skipped" in needed
    ):
        found["skipped"] = f"the {section.needs} section did not run to its end"
    elif share < minimum:
        found["skipped"] = f"its share of the budget is {share:.0f} s, it needs at least {minimum:.0f} s"
    else:
        try:
            section.run(run, found, Clock(time.monotonic() + share))
            found["status"] = "done"
        except SectionCut as exc:
            found["status"] = f"cut: {exc}"
        except Exception as exc:  # recorded: one broken section must not hide the others' figures
            found["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"   {section.name} failed: {found['error']}", flush=True)
    if "skipped" in found or "error" in found:
        found.pop("status")
        print(f"   {section.name}: {found.get('skipped') or 'failed'}", flush=True)
    found["seconds"] = round(time.perf_counter() - started, 1)
    results["total_s"] = round(budget.seconds - budget.left(), 1)
    write(results, out)


def prepare(args: argparse.Namespace) -> tuple[dict[str, Any], int | None]:
    """Wheels installed, what is missing named, CUDA checked: (environment, exit status or None)."""
    environment: dict[str, Any] = {}
    if args.wheels:
        try:
            environment["wheels"] = install_wheels(
                Path(args.wheels), Path(tempfile.mkdtemp(prefix="cocoshard-site-"))
            )
        except RuntimeError as exc:
            print(f"tools/device-check: {exc}", file=sys.stderr)
            return environment, NO_CUDA
        print(f"installed offline: {', '.join(environment['wheels']['installed'])}", flush=True)
    environment["missing"] = missing_modules()
    if environment["missing"]:
        print(
            f"missing here: {', '.join(environment['missing'])} (bash tools/device-wheels where PyPI is "
            "reachable, then --wheels .device/wheels); the sections that need them will say so",
            flush=True,
        )
    import torch

    if not args.rehearse_on_cpu and not torch.cuda.is_available():
        print(
            f"tools/device-check measures cocoshard on a CUDA GPU, and this machine has none "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
            f"torch.cuda.is_available() is False). Run it on a machine with one; "
            f"`tools/device-check --rehearse-on-cpu` runs every section tiny on this CPU.",
            file=sys.stderr,
        )
        return environment, NO_CUDA
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(REPO))))
    return environment, None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    environment, refused = prepare(args)
    if refused is not None:
        return refused
    out = Path(args.out)
    chosen = [s for s in SECTIONS if s.name in args.sections.split(",")]
    budget = Budget(args.budget, {s.name: s.weight for s in chosen})
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "environment": environment,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work", "wheels")},
        "budget": {"seconds": args.budget, "weights": budget.weights}, "sections": {},
    }  # fmt: skip
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cocoshard-device-check-"))
    run = Run(args, "cpu" if args.rehearse_on_cpu else "cuda", work, out, budget.share)
    try:
        for section in chosen:
            run_section(section, run, budget, results, out)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, found in results["sections"].items() if "error" in found]
    print(
        f"written to {out / 'device-check.json'} and device-check.md in {results.get('total_s', 0)} s "
        f"of a {args.budget:.0f} s budget" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
