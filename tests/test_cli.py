"""The command line as a user meets it: entry points, from wherever they are started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from cocoshard import __version__, cli

REPO = Path(__file__).resolve().parents[1]


def test_python_m_cocoshard_works_from_the_folder_holding_a_clone_named_cocoshard(tmp_path) -> None:
    """`git clone` names the folder cocoshard; started beside it, `python -m cocoshard` (and what
    torchrun runs) must still find the package, not the clone as an empty namespace package."""
    (tmp_path / "cocoshard").symlink_to(REPO, target_is_directory=True)
    commands = {
        "python -m cocoshard": [sys.executable, "-m", "cocoshard", "--version"],
        "torchrun -m cocoshard": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "cocoshard",
            "--version",
        ],
    }
    for name, command in commands.items():
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
        assert f"cocoshard {__version__}" in done.stdout, name


def test_an_unknown_flag_names_the_closest_one_under_a_short_usage(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--epoch", "3"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "unrecognized flag --epoch: did you mean --epochs?" in err
    assert len(err.strip().splitlines()) <= 2 and "'3'" not in err, err  # no 20 lines of usage
    with pytest.raises(SystemExit):
        cli.main(["trian"])
    assert "did you mean train?" in capsys.readouterr().err


def test_the_help_speaks_of_commands_and_train_groups_its_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    assert "cocoshard pack --root ms-coco" in top and "config" not in top and "run()" not in top
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    train = capsys.readouterr().out
    titles = ["data and outputs:", "model:", "optimisation:", "loss:", "speed:", "run control:"]
    positions = [train.index(title) for title in titles]
    assert positions == sorted(positions) and positions[2] < train.index("--lr") < positions[3]
    with pytest.raises(SystemExit):
        cli.main(["thresholds", "--help"])
    assert "(default: 10)" in " ".join(capsys.readouterr().out.split())  # --min-positives


def test_sighup_ends_a_command_like_sigterm(monkeypatch, capsys) -> None:
    """A closed terminal sends SIGHUP: the command stops as on Ctrl-C, saying so, exit 129."""

    class StillRunning(Exception):
        pass

    def unhandled(signum, frame):  # what the old default did: kill the process unannounced
        raise StillRunning

    def command(name, cfg):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)  # the signal arrives before this ends
        return 0

    previous = signal.signal(signal.SIGHUP, unhandled)
    monkeypatch.setattr(cli, "run_command", command)
    try:
        assert cli.main(["info"]) == 128 + signal.SIGHUP
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert "interrupted by SIGHUP" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGHUP) is previous  # put back once the command ends


def test_a_forked_worker_stopped_before_its_own_handlers_ends_quietly(monkeypatch, capsys) -> None:
    """A worker forked by a command inherits its stop handler; SIGTERM caught before the worker
    installs its own must end it by the signal, not raise the command's interrupt inside it (which a
    process pool prints as a traceback from the worker's initializer)."""

    def command(name, cfg):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: still running the command's handler
            os.close(read)
            os.write(write, b"ready")
            try:
                time.sleep(30)
            except BaseException:  # what the old handler did: raise inside the worker
                os._exit(3)
            os._exit(0)
        os.close(write)
        assert os.read(read, 5) == b"ready"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        return 10 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    monkeypatch.setattr(cli, "run_command", command)
    assert cli.main(["info"]) == 10 + signal.SIGTERM


def test_a_plain_editable_install_puts_the_clone_on_sys_path(tmp_path) -> None:
    """`pip install -e .` without editable_mode=compat: the clone's folder goes on sys.path (a static
    .pth), so the package is found before a folder named cocoshard in the current directory."""
    clone = tmp_path / "cocoshard"
    clone.mkdir()
    shutil.copy(REPO / "pyproject.toml", clone)
    shutil.copy(REPO / "README.md", clone)
    shutil.copytree(REPO / "cocoshard", clone / "cocoshard", ignore=shutil.ignore_patterns("__pycache__"))
    build = "from setuptools import build_meta; print(build_meta.build_editable(r'%s'))" % (
        tmp_path / "wheel"
    )
    done = subprocess.run(
        [sys.executable, "-c", build], cwd=clone, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "wheel" / done.stdout.strip().splitlines()[-1]) as wheel:
        names = wheel.namelist()
        paths = [wheel.read(name).decode().split() for name in names if name.endswith(".pth")]
    assert not [name for name in names if name.endswith("_finder.py")], names  # no import hook
    assert paths == [[str(clone)]], paths
