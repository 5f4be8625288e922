"""The documents say what is true: every test they cite exists, every module is described, and the
README's snippet for using the shards elsewhere runs as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
CITED = re.compile(r"`((?:[\w]+/)*test_\w+\.py)::(\w+)")


def _defined(path: Path, name: str) -> bool:
    return re.search(rf"^def {re.escape(name)}\(", path.read_text(), re.MULTILINE) is not None


@pytest.mark.parametrize(
    "document", ["docs/reliability.md", "docs/architecture.md", "docs/scale-out.md", "README.md"]
)
def test_every_test_a_document_cites_exists(document):
    text = (REPO / document).read_text()
    missing = [
        f"{file}::{name}"
        for file, name in CITED.findall(text)
        if not (TESTS / file).is_file() or not _defined(TESTS / file, name)
    ]
    assert not missing, f"{document} cites tests that do not exist: {missing}"


def test_the_architecture_document_describes_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = [
        p
        for p in (REPO / "cocoshard").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "cocoshard"
    ]
    undescribed = [
        str(p.relative_to(REPO))
        for p in modules
        if f"`{p.name}`" not in text and f"`cocoshard/{p.name}`" not in text
    ]
    assert not undescribed, f"docs/architecture.md does not describe: {undescribed}"


def _readme_snippet(title: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_snippet_for_plain_webdataset_runs_on_packed_shards(sample_shards_jpeg, tmp_path):
    snippet = _readme_snippet("Use the shards elsewhere")
    (tmp_path / "shards").symlink_to(sample_shards_jpeg)
    script = tmp_path / "snippet.py"
    script.write_text(
        snippet.replace("batched(128)", "batched(16)").replace("num_workers=4", "num_workers=2")
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.Size([16, 3, 224, 224]) torch.Size([16, 80])" in done.stdout, done.stdout
