"""docs/development.md's project layout lists every module of the package, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout() -> str:
    """The layout's code block."""
    text = (ROOT / "docs" / "development.md").read_text()
    section = text[text.index("## Project layout") :]
    return section.split("```")[1]


def test_the_layout_lists_every_module_and_only_those() -> None:
    layout = _layout()
    package = ROOT / "sepify"
    modules = {p.relative_to(package) for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    missing = []
    for module in sorted(modules):
        folder = f"{module.parent.name}/" if module.parent != Path(".") else ""
        block = layout if not folder else layout[layout.index(folder) :]  # from the folder's entry on
        if not re.search(rf"(?<![\w/]){re.escape(module.name)}", block):
            missing.append(str(module))
    assert not missing, f"docs/development.md's layout does not list {missing}"
    named = set(re.findall(r"([a-z_]+\.py)", layout))
    existing = {p.name for p in package.rglob("*.py")}
    assert named <= existing, f"the layout names modules that do not exist: {sorted(named - existing)}"
    folders = {f"{p.name}/" for p in package.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert all(folder in layout for folder in folders)
