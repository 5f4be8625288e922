"""`tools/device-check`: offline wheels, a budget shared by sections, results that survive a kill.

GPU time is scarce and the GPU machine is offline, so the script must work the first time it meets
one. Here it is rehearsed on the CPU the way it will run there: in a fresh virtual environment that
lacks webdataset (as a preinstalled PyTorch image does), the missing packages installed from a
wheel folder with `pip install --no-index` while every proxy and index points at a listener that
counts connections (none may come), then every section run to its end. Killed halfway, the JSON
holds the sections that finished.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "device-check"
# What a GPU machine's PyTorch image may lack (its distributions, in the order the check names them)
# and the top-level names they install; the bare environment also lacks Hugging Face `datasets`.
HIDDEN = ("pytest-timeout", "webdataset", "braceexpand", "PyYAML")
HIDDEN_NAMES = ("pytest_timeout", "webdataset", "braceexpand", "yaml", "_yaml", "pyyaml", "datasets")


def _tools(name: str):
    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float, python: str | None = None, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    command = [python, str(REPO / "tools" / "device_check.py")] if python else [str(SCRIPT)]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        # no GPU, even on a machine that has one; the wrapper runs this Python
        env={**base, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **env},
    )


# ----------------------------------------------------------------------------------- fast


def test_without_cuda_it_says_so_and_does_nothing(tmp_path):
    done = _run("--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2
    assert "measures cocoshard on a CUDA GPU, and this machine has none" in done.stderr
    assert "--rehearse-on-cpu" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_budget_goes_by_weight_and_what_a_section_leaves_goes_to_the_later_ones():
    share_of = _tools("device_check").share_of
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    assert share_of(400, weights, "a", "a") == 100
    assert share_of(400, weights, "c", "a") == 200  # projected: if a and b use exactly theirs
    assert share_of(390, weights, "b", "b") == 130  # a used 10 s of its 100: b and c share the rest
    assert share_of(390, weights, "c", "b") == 260


def test_the_data_size_is_the_largest_both_shares_allow():
    choose = _tools("device_training").choose_train_images
    # data made at 500 images/s with 60 s left: room for 25,500; 5 modes of a 200 s share at 3,000 images/s
    chosen, why = choose(500, 60, 200, 3_000, "cuda", 52_000)
    assert chosen == 25_500 and "bound by the data section's share" in why
    chosen, why = choose(5_000, 60, 200, 3_000, "cuda", 52_000)
    assert chosen == int((200 / 5 - 20) * 3_000 * 0.7 / 1.2) and "bound by the epochs section's share" in why
    chosen, why = choose(50_000, 600, 6_000, 20_000, "cuda", 52_000)
    assert chosen == 52_000 and "bound by the cap of 52,000" in why


def test_a_command_past_its_share_is_cut_and_a_crash_is_a_failure(tmp_path):
    sections = _tools("device_sections")
    log = tmp_path / "log"
    said = sections.command(
        [sys.executable, "-c", "print('said')"], sections.Clock(time.monotonic() + 60), log
    )
    assert said == "said\n" and log.read_text() == "said\n"  # streamed into the log as it comes
    started = time.monotonic()
    with pytest.raises(sections.SectionCut, match="stopped at the end of the section's share of the budget"):
        sections.command(
            [sys.executable, "-c", "import time; time.sleep(60)"], sections.Clock(time.monotonic() + 1)
        )
    assert time.monotonic() - started < 30
    crash = "import os, signal; print('before'); os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(RuntimeError, match=r"exited with -9:\nbefore"):
        sections.command([sys.executable, "-c", crash], sections.Clock(time.monotonic() + 60))


def test_a_section_without_its_share_is_skipped_and_a_broken_one_recorded_and_both_written(tmp_path):
    check = _tools("device_check")
    sections = _tools("device_sections")
    budget = check.Budget(20, {"first": 1.0, "second": 1.0, "third": 2.0})
    run = sections.Run(argparse.Namespace(), "cpu", tmp_path / "work", tmp_path / "out", budget.share)
    results: dict = {"sections": {}}

    def broken(run, found, clock):
        found["partial"] = 1
        raise ValueError("no such thing")

    check.run_section(check.Section("first", 1.0, (1, 1), broken), run, budget, results, tmp_path / "out")
    check.run_section(check.Section("second", 1.0, (1, 60), broken), run, budget, results, tmp_path / "out")
    check.run_section(
        check.Section("third", 2.0, (1, 1), broken, needs="first"), run, budget, results, tmp_path / "out"
    )
    written = json.loads((tmp_path / "out" / "device-check.json").read_text())["sections"]
    assert written["first"]["error"] == "ValueError: no such thing" and written["first"]["partial"] == 1
    assert (
        written["second"]["skipped"] == "its share of the budget is 7 s, it needs at least 60 s"
    )  # 20 s / 3
    assert written["third"]["skipped"] == "the first section did not run to its end"
    assert "| second | 7 |" in (tmp_path / "out" / "device-check.md").read_text()


@pytest.mark.parametrize(
    ("wheel", "fits"),
    [
        ("webdataset-1.0.2-py3-none-any.whl", True),
        ("braceexpand-0.1.7-py2.py3-none-any.whl", True),
        (
            "pyyaml-6.0.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
            True,
        ),
        ("pyyaml-6.0.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", False),  # another Python
        ("torchcodec-0.17.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", True),
        ("torchcodec-0.17.0-cp312-cp312-manylinux_2_34_x86_64.whl", False),  # needs a newer glibc
        ("pyyaml-6.0.4-cp312-cp312-manylinux_2_17_aarch64.whl", False),  # another processor
        ("something-1.0-cp310-abi3-manylinux_2_17_x86_64.whl", True),  # the stable ABI, from 3.10 on
        ("tomli-2.5.0-cp312-cp312-win_amd64.whl", False),
        ("not-a-wheel.zip", False),
    ],
)
def test_a_wheel_fits_this_python_by_its_tags(wheel, fits):
    wheel_fits = _tools("device_env").wheel_fits
    assert wheel_fits(wheel, python=(3, 12), machine="x86_64", glibc=(2, 31)) is fits


def test_the_markdown_reports_failed_and_skipped_sections_and_the_chosen_data():
    markdown = _tools("device_report").markdown(
        {
            "started": "now",
            "machine": {
                "gpu": "NVIDIA H200",
                "gpu_memory_gib": 139.8,
                "cpu_cores": 16,
                "image_backend": "torchcodec 0.17.0",
            },
            "environment": {
                "wheels": {"folder": ".device/wheels", "installed": ["webdataset-1.0.2-py3-none-any.whl"]}
            },
            "budget": {"seconds": 360},
            "total_s": 350.5,
            "sections": {
                "cuda-tests": {
                    "share_s": 94,
                    "seconds": 80.0,
                    "status": "done",
                    "counts": {"failed": 1, "passed": 20},
                    "failures": {"tests/x.py::test_y": "assert 3 == 0"},
                    "error": "RuntimeError: 1 of 21 cuda tests failed",
                },  # fmt: skip
                "data": {
                    "share_s": 50,
                    "seconds": 30.0,
                    "status": "done",
                    "train_images": 20_000,
                    "why": "20,000 images: bound",
                },
                "bench": {
                    "share_s": 3,
                    "skipped": "its share of the budget is 3 s, it needs at least 40 s",
                    "seconds": 0.0,
                },
                "ceiling": {
                    "rows": [
                        {
                            "model": "resnet18",
                            "compile": False,
                            "batch_size": 256,
                            "images_per_s": 9000.0,
                            "host_syncs_per_step": 0.0,
                        },
                        {"model": "maxvit_t", "compile": True, "error": "BackendCompilerFailed: no\nmore"},
                        {
                            "model": "resnet50",
                            "compile": True,
                            "skipped": "needs ~70 s, 20 s left of the section's share",
                        },
                    ]
                },  # fmt: skip
                "epochs": {
                    "rows": [
                        {
                            "mode": "resident",
                            "model": "resnet18",
                            "images_per_s": 8100.0,
                            "data_wait_share": 0.02,
                            "gpu_utilisation": {"mean_pct": 97.5},
                            "train_s": 6.4,
                        },
                        {"mode": "stream-jpeg", "model": "resnet18", "error": "RuntimeError: out of memory"},
                    ]
                },  # fmt: skip
            },
        }
    )
    assert (
        "NVIDIA H200 (139.8 GiB), 16 CPU cores" in markdown
        and "image decoding: torchcodec 0.17.0" in markdown
    )
    assert "Installed offline from .device/wheels: webdataset-1.0.2-py3-none-any.whl" in markdown
    assert "| cuda-tests | 94 | 80.0 | failed: `RuntimeError: 1 of 21 cuda tests failed` |" in markdown
    assert "| bench | 3 | 0.0 | skipped: its share of the budget is 3 s, it needs at least 40 s |" in markdown
    assert "1 failed, 20 passed" in markdown and "- FAILED `tests/x.py::test_y`: assert 3 == 0" in markdown
    assert "| resnet18 | False | 256 | 9,000 | 0.0 |" in markdown
    assert "| maxvit_t | True | | failed: BackendCompilerFailed: no | |" in markdown
    assert "| resnet50 | True | | skipped: needs ~70 s, 20 s left of the section's share | |" in markdown
    assert "Data: 20,000 images: bound." in markdown
    assert "| resident | 8,100 | 90% | 2% | 98% | 6.4 |" in markdown  # 8,100 of a 9,000 ceiling
    assert "| stream-jpeg | failed: RuntimeError: out of memory |" in markdown


# ----------------------------------------------------------------------------------- rehearsals


class Listener:
    """A loopback TCP port that counts the connections made to it (every proxy and index points here)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def env(self) -> dict[str, str]:
        proxies = {
            k: self.url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")
        }
        return {**proxies, "PIP_INDEX_URL": f"{self.url}/simple", "PIP_FIND_LINKS": f"{self.url}/links"}


def wheel_of(distribution: str, folder: Path) -> Path:
    """A wheel rebuilt from an installed distribution's files (nothing is downloaded), installable on
    this same Python: its dist-info folder as installed, a RECORD without hashes."""
    dist = md.distribution(distribution)
    info = next(str(f).split("/")[0] for f in dist.files or [] if str(f).endswith(".dist-info/METADATA"))
    path = folder / f"{info.removesuffix('.dist-info')}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(path, "w") as archive:
        for file in dist.files or []:
            text = str(file)
            if text.startswith("..") or "__pycache__" in text or not Path(dist.locate_file(file)).is_file():
                continue
            if text.endswith(("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                continue
            archive.write(dist.locate_file(file), text)
            records.append(f"{text},,")
        archive.writestr(f"{info}/RECORD", "\n".join([*records, f"{info}/RECORD,,"]) + "\n")
    return path


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment that sees this one's packages except HIDDEN and `datasets` (and
    cocoshard itself, which the check imports from the checkout): a PyTorch image without them."""
    root = tmp_path_factory.mktemp("bare")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120
    )
    python = root / "venv" / "bin" / "python"
    shadow = root / "site-packages"
    shadow.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        lowered = entry.name.lower()
        if lowered.startswith((*HIDDEN_NAMES, "cocoshard", "__editable__")) or entry.suffix == ".pth":
            continue
        (shadow / entry.name).symlink_to(entry)
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(own).mkdir(parents=True, exist_ok=True)
    (Path(own) / "project-packages.pth").write_text(f"{shadow}\n")
    return python


@pytest.mark.slow
def test_a_bare_environment_names_what_it_misses_then_installs_it_offline_and_rehearses_every_section(
    bare_python, tmp_path
):
    probe = subprocess.run(
        [str(bare_python), "-c", "import torch, webdataset"], capture_output=True, timeout=120
    )
    assert probe.returncode != 0 and b"No module named 'webdataset'" in probe.stderr  # truly without it

    listener = Listener()
    bare = _run("--rehearse-on-cpu", "--sections", "decode", "--out", str(tmp_path / "bare"),
                timeout=300, python=str(bare_python), **listener.env())  # fmt: skip
    assert bare.returncode == 0, bare.stdout[-3000:] + bare.stderr[-3000:]
    missing = [line for line in bare.stdout.splitlines() if line.startswith("missing here:")]
    named = "pytest-timeout, webdataset, braceexpand, pyyaml"
    assert len(missing) == 1 and missing[0].startswith(f"missing here: {named} (bash tools/device-wheels")
    environment = json.loads((tmp_path / "bare" / "device-check.json").read_text())["environment"]
    assert environment["missing"] == named.split(", ")

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for distribution in HIDDEN:
        wheel_of(distribution, wheels)
    out = tmp_path / "out"
    settings = ("--rehearse-on-cpu", "--no-peers", "--budget", "900", "--work", str(tmp_path / "work"))
    done = _run("--wheels", str(wheels), *settings, "--out", str(out), timeout=1200, python=str(bare_python),
                **listener.env())  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert listener.connections == 0  # pip never asked the network
    results = json.loads((out / "device-check.json").read_text())
    environment = results["environment"]
    installed = sorted(wheel.split("-")[0].lower() for wheel in environment["wheels"]["installed"])
    assert installed == sorted(name.lower().replace("-", "_") for name in HIDDEN)
    assert environment["missing"] == [] and "missing here" not in done.stdout
    sections = results["sections"]
    assert list(sections) == ["cuda-tests", "decode", "ceiling", "data", "epochs", "predict", "bench"]
    assert {name: found.get("status") for name, found in sections.items()} == dict.fromkeys(sections, "done")
    assert sections["cuda-tests"]["counts"]["skipped"] >= 1  # collected, and skipped without CUDA
    assert sections["data"]["train_images"] == 96 and "bound by" in sections["data"]["why"]
    modes = [row["mode"] for row in sections["epochs"]["rows"]]
    assert modes == [name for name, *_ in _tools("device_sections").MODES]
    assert all(
        row["images_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1 for row in sections["epochs"]["rows"]
    )
    assert sections["ceiling"]["rows"][0]["images_per_s"] > 0
    assert sections["predict"]["evaluate_test"]["format_ok"] is True
    assert set(sections["bench"]["report"]["pipelines"]) >= {"folder", "stream-jpeg", "resident-jpeg-device"}
    assert any(name.startswith("decode torchvision") for name in sections["bench"]["report"]["decode"])
    markdown = (out / "device-check.md").read_text()
    headings = ("## `pytest -m cuda`", "## JPEG decoding", "## Training-step ceiling", "## Loaders",
                "## One `cocoshard train --amp` epoch", "## Predict and evaluate")  # fmt: skip
    assert all(heading in markdown for heading in headings)


@pytest.mark.slow
def test_killed_halfway_the_json_holds_the_sections_that_finished(tmp_path):
    out = tmp_path / "out"
    base = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "device_check.py"), "--rehearse-on-cpu", "--sections",
         "decode,ceiling,data", "--out", str(out), "--work", str(tmp_path / "work")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**base, "CUDA_VISIBLE_DEVICES": ""},
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            path = out / "device-check.json"
            if path.exists() and "data" in json.loads(path.read_text())["sections"]:
                break  # decode and ceiling are done, data has started
            time.sleep(0.2)
        assert process.poll() is None, "the check ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    sections = json.loads((out / "device-check.json").read_text())["sections"]
    assert sections["decode"]["status"] == "done" and sections["decode"]["rows"]
    assert sections["ceiling"]["status"] == "done" and sections["ceiling"]["rows"][0]["images_per_s"] > 0
    assert sections["data"]["status"] == "running"  # what was running when it died
    assert "| decode |" in (out / "device-check.md").read_text()
