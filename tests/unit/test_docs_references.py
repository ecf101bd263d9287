"""Every document a docstring or comment points to is in the repository, and so is the section it names."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("kernels", "stages", "pipelines", "bench", "tests")
DOC_REF = re.compile(r"docs/([A-Za-z0-9_-]+\.md)(?:, ([A-Z][A-Za-z0-9 /-]+?)(?=[:;)]|$))?")


def _python_files() -> list[Path]:
    this = Path(__file__).resolve()
    return [p for d in SOURCES for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts and p != this]


def test_docs_references_resolve_inside_the_repo() -> None:
    checked = 0
    for path in _python_files():
        text = path.read_text()
        assert "../" + "shared" not in text, f"{path} cites a document outside the repository"
        for line in text.splitlines():
            for name, section in DOC_REF.findall(line):
                doc = REPO / "docs" / name
                assert doc.is_file(), f"{path} cites docs/{name}, which does not exist"
                if section:
                    headings = [h.lstrip("#").strip() for h in doc.read_text().splitlines() if h.startswith("#")]
                    assert any(h.startswith(section.strip()) for h in headings), f"{path}: no '{section}' in {name}"
                checked += 1
    assert checked >= 10  # the kernels cite docs/formats.md throughout


def test_no_module_cites_the_old_layout() -> None:
    old = re.compile(
        r"stages/common|stages\.common|kernels/(bnb_format|checkpoint4bit|peft_format|gptq_format|gguf_export)"
    )
    for path in [*_python_files(), *(REPO / "docs").glob("*.md"), REPO / "README.md"]:
        assert not old.search(path.read_text()), f"{path} names a module that moved"
