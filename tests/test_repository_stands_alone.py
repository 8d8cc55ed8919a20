"""The repository stands alone: code, docs, configs and generated reports cite only documents it
contains (docs/METHOD.md, docs/DATA.md, ...), never notes or issue numbers from outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ("training", "serving", "clients", "benchmarks", "tests", "docs", "configs", "deploy")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".pbtxt", ".sh", ".toml", ".cfg"}
OUTSIDE = re.compile(r"\bNOTES\b|NOTES\.md|\bSTYLE\b|\bissue \d+|\(issue:|shared/|habit \d+")
SECTION = re.compile(r"§")  # a section sign must follow a document of this repository
LINK = re.compile(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)")


def _files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for top in SEARCHED:
        files += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return [p for p in files if p.is_file() and p.name != Path(__file__).name]


def test_no_reference_to_documents_outside_the_repository():
    found = []
    for path in _files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) or (SECTION.search(line) and "METHOD.md" not in line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "references to documents the repository does not contain:\n" + "\n".join(found)


@pytest.mark.parametrize("name", ["METHOD.md", "DATA.md"])
def test_the_method_and_data_docs_exist_and_their_links_resolve(name):
    doc = ROOT / "docs" / name
    text = doc.read_text(encoding="utf-8")
    assert len(text) > 2000
    for target in LINK.findall(text):
        assert (doc.parent / target).is_file(), f"{name} links to a missing {target}"
