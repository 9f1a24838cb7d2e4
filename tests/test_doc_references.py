"""Every document the code cites is in this repository, with the section cited (CONTRIBUTING.md,
"Where things go").

Scanned: the Python and proto sources of client/, server/, tests/, bench/ and proto/. A citation is
a path ending in `.md` (relative to the repository root), optionally followed by section names in
double quotes (`docs/design.md, "Life of a push"`), which must be headings of that file; and a
`§` number, which must be a section of docs/optimizer-catalogue.md, named in the same file. A
quoted file name (`"README.md"`) is a path in code, not a citation.
"""

from __future__ import annotations

import os
import re

from tests.conftest import ROOT

SCANNED_DIRS = ("client", "server", "tests", "bench", "proto")
CATALOGUE = "docs/optimizer-catalogue.md"

# a path ending in .md, not inside quotes, not part of a longer path or name, and not the target of a
# markdown link (relative to the page it is generated into, e.g. spec/docs.py's)
CITED_FILE = re.compile(r"(?<![\w./'\"-])(?<!\]\()((?:[\w-]+/)*[\w.-]+\.md)(?![\w'\"])")
# what may follow it: section names in double quotes, separated by commas, "and" or semicolons
CITED_SECTIONS = re.compile(r'\A[,:]?\s*\(?\s*((?:"[^"\n]+"\s*(?:,|;|and)?\s*)+)')
QUOTED = re.compile(r'"([^"\n]+)"')
SECTION_SIGN = re.compile(r"§\s?([0-9]+(?:\.[0-9]+[a-z]?)?|Notation)")


def sources() -> list[tuple[str, str]]:
    """(path relative to the root, text) of every scanned source file."""
    out = []
    for top in SCANNED_DIRS:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "node_modules") and not d.startswith("."))
            for name in sorted(files):
                if name.endswith((".py", ".proto")):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        out.append((os.path.relpath(path, ROOT), f.read()))
    return out


def headings(markdown: str) -> set[str]:
    """The headings of a markdown text, without their '#' marks and section numbers."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#+\s+(?:[0-9]+(?:\.[0-9]+)*\.?\s+)?(.+?)\s*$", line)
        if m:
            out.add(m.group(1))
    return out


def catalogue_sections(markdown: str) -> set[str]:
    """The § numbers of the catalogue: its numbered headings (`## 2.`, `### 3.1`), its numbered
    paragraphs (`**2.6b ...`), the numbered items of section 4 (`§4.9`), and `Notation`."""
    out = {"Notation"}
    section = None
    for line in markdown.splitlines():
        heading = re.match(r"#+\s+([0-9]+(?:\.[0-9]+)?)\.?\s", line)
        if heading:
            section = heading.group(1)
            out.add(section)
            continue
        bold = re.match(r"\*\*([0-9]+\.[0-9]+[a-z]?)\s", line)
        if bold:
            out.add(bold.group(1))
        item = re.match(r"([0-9]+)\.\s", line)
        if item and section == "4":
            out.add(f"4.{item.group(1)}")
    return out


def citations(text: str) -> list[tuple[str, list[str], int]]:
    """(cited file, cited section names, line) for each citation of a .md file in `text`."""
    out = []
    for m in CITED_FILE.finditer(text):
        after = CITED_SECTIONS.match(text[m.end() : m.end() + 300])
        names = QUOTED.findall(after.group(1)) if after else []
        out.append((m.group(1), names, text.count("\n", 0, m.start()) + 1))
    return out


def missing_citations(files: list[tuple[str, str]], root: str) -> list[str]:
    problems = []
    for path, text in files:
        for cited, names, line in citations(text):
            target = os.path.join(root, cited)
            if not os.path.isfile(target):
                problems.append(f"{path}:{line}: cites {cited}, which is not in the repository")
                continue
            with open(target, encoding="utf-8") as f:
                known = headings(f.read())
            problems += [
                f"{path}:{line}: cites {cited}, section {name!r}, which it does not have"
                for name in names
                if name not in known
            ]
    return problems


def missing_catalogue_sections(files: list[tuple[str, str]], known: set[str]) -> list[str]:
    problems = []
    for path, text in files:
        signs = [(m.group(1), text.count("\n", 0, m.start()) + 1) for m in SECTION_SIGN.finditer(text)]
        if signs and CATALOGUE not in text:
            problems.append(f"{path}:{signs[0][1]}: cites §{signs[0][0]} but does not name {CATALOGUE}")
        problems += [
            f"{path}:{line}: §{number} is not a section of {CATALOGUE}" for number, line in signs if number not in known
        ]
    return problems


def test_cited_documents_and_sections_exist():
    problems = missing_citations(sources(), ROOT)
    assert not problems, f"{len(problems)} citations of documents or sections that do not exist:\n" + "\n".join(
        problems
    )


def test_cited_catalogue_sections_exist():
    with open(os.path.join(ROOT, CATALOGUE), encoding="utf-8") as f:
        known = catalogue_sections(f.read())
    problems = missing_catalogue_sections(sources(), known)
    assert not problems, f"{len(problems)} § citations that point nowhere:\n" + "\n".join(problems)


def test_the_scan_finds_citations(tmp_path):
    """The checks see real citations, and report a missing file, section or § number."""
    found = {(path, cited) for path, text in sources() for cited, _, _ in citations(text)}
    assert ("server/optserve/server/checkpoint/manager.py", "docs/design.md") in found
    assert ("server/optserve/server/checkpoint/manager.py", "README.md") in found

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## 2. Layers\n\n### Sub part\n")
    md = ".md"  # kept apart so that this file cites nothing itself
    text = (
        f'x = 1  # docs/a{md}, "Layers" and "Sub part"; docs/a{md} ("Gone")\n'
        f'y = 2  # see docs/nowhere{md}, and open("docs/a{md}")\n'
    )
    problems = missing_citations([("t.py", text)], str(tmp_path))
    assert problems == [
        f"t.py:1: cites docs/a{md}, section 'Gone', which it does not have",
        f"t.py:2: cites docs/nowhere{md}, which is not in the repository",
    ], problems

    catalogue = "## 2. Rules\n**2.6b Flux.** x\n## 4. Gotchas\n1. **one**\n9. **nine**\n## 5. Log\n"
    known = catalogue_sections(catalogue)
    assert known == {"Notation", "2", "2.6b", "4", "4.1", "4.9", "5"}, known
    sign = "§"
    assert missing_catalogue_sections([("t.py", f"{CATALOGUE} {sign}4.9, {sign}2.6b, {sign}4.2")], known) == [
        f"t.py:1: {sign}4.2 is not a section of {CATALOGUE}"
    ]
    assert missing_catalogue_sections([("u.py", f"see {sign}4.9")], known) == [
        f"u.py:1: cites {sign}4.9 but does not name {CATALOGUE}"
    ]
