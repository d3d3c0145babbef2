"""The tutorials run and print the numbers their docs pages quote; the CLI reference is what typer generates.

Marked ``tutorials``: they need the tutorials extra (torchcrepe, scikit-image, facenet-pytorch) and a minute or
two each; CI runs them with ``pytest -m tutorials``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> (docs page, the marker of the line the page quotes)
TUTORIALS = {
    "quickstart.py": ("digits.md", "test accuracy: "),
    "crepe.py": ("crepe.md", "raw pitch accuracy: "),
    "mtcnn.py": ("mtcnn.md", "faces found again: "),
    "checkpoint.py": ("checkpoint.md", "converted 8 of 20 convs"),
}


@pytest.mark.tutorials
@pytest.mark.parametrize("script", list(TUTORIALS))
def test_tutorial_prints_what_its_page_quotes(script: str, tmp_path: Path) -> None:
    page, marker = TUTORIALS[script]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    quoted = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    assert quoted, done.stdout
    text = (ROOT / "docs" / "tutorials" / page).read_text()
    for line in quoted:
        assert line in text, f"{page} does not quote what {script} printed: {line!r}"


def test_cli_reference_is_current() -> None:
    pytest.importorskip("typer")
    done = subprocess.run(
        [sys.executable, "-m", "typer", "sepify.cli", "utils", "docs", "--name", "sepify", "--title",
         "Command-line reference"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    committed = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert done.stdout.strip() == committed.strip(), (
        "docs/reference/cli.md is stale; run: typer sepify.cli utils docs --name sepify "
        "--title 'Command-line reference' --output docs/reference/cli.md"
    )
