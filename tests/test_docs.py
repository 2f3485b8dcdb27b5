"""The methods document is in the repository and every citation of it resolves.

The code cites ``docs/methods.md §N`` instead of notes outside the repository: no file of the
package, the tests, the benchmarks, the scripts, the examples or the README may point outside, and every section cited
must exist as a heading of docs/methods.md.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
SCANNED = ("attn_audit", "tests", "benchmarks", "scripts", "examples")
TEXT_SUFFIXES = {".py", ".sh", ".txt", ".toml", ".md", ".cfg", ".ini", ".yml", ".yaml", ".json"}
# Built from parts so that this file does not match itself.
FORBIDDEN = ("theory" + ".md", "../" + "shared", "shared" + "/docs")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
CITATION = re.compile(r"docs/methods\.md\s+§(\d+(?:\.\d+)*)")


def _texts() -> dict[Path, str]:
    """Every text file under the scanned folders, plus the README."""
    files = [ROOT / "README.md"]
    for folder in SCANNED:
        files += [p for p in (ROOT / folder).rglob("*")
                  if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return {p: p.read_text(encoding="utf-8") for p in files}


def _headings() -> list[str]:
    """Section numbers of the headings of docs/methods.md, in order."""
    out = []
    for line in METHODS.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            m = SECTION.search(line)
            if m:
                out.append(m.group(1))
    return out


def test_no_reference_points_outside_the_repository() -> None:
    texts = _texts()
    assert len(texts) > 50  # the scan really covers the package and the tests
    bad = [f"{p.relative_to(ROOT)}: {word}" for p, text in texts.items()
           for word in FORBIDDEN if word in text]
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def test_methods_headings_are_numbered_once() -> None:
    heads = _headings()
    assert len(heads) > 40
    assert len(heads) == len(set(heads)), [h for h in heads if heads.count(h) > 1]
    for h in heads:  # every subsection sits under its section
        if "." in h:
            assert h.rsplit(".", 1)[0] in heads, h


def test_every_cited_section_exists() -> None:
    """``docs/methods.md §X`` citations, and the bare ``§Y`` of files that cite it, resolve."""
    heads = set(_headings())
    cited: dict[str, list[str]] = {}
    for p, text in _texts().items():
        explicit = CITATION.findall(text)
        if not explicit and "docs/methods.md" not in text:
            continue
        for sec in set(explicit) | set(SECTION.findall(text)):
            cited.setdefault(sec, []).append(str(p.relative_to(ROOT)))
    assert len(cited) >= 20  # the code does cite the document
    missing = {sec: files for sec, files in cited.items() if sec not in heads}
    assert not missing, f"sections cited but not in docs/methods.md: {missing}"


def test_readme_links_the_methods_document() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    top = readme.split("\n## ", 1)[0]
    assert "docs/methods.md" in top  # linked from the introduction
    measures = readme.split("## What it measures", 1)[1].split("\n## ", 1)[0]
    assert "docs/methods.md" in measures
