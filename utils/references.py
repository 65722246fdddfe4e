"""The course bibliography tied to the code: paper → ``utils`` implementation → lesson section.

One source of truth, ``references.bib``. Besides the usual BibTeX fields an entry may carry

* ``implemented_by`` — comma-separated dotted names of the ``utils`` objects that implement it;
* ``syllabus`` — the chapters whose syllabus section lists it;
* ``correction`` — what was corrected relative to the syllabus's citation.

Lessons cite with MyST roles (``{footcite:t}`key` ``, ``{cite:p}`a,b` ``). This module parses
both sides, so chapter 12's tables are generated and :func:`check` (run by the tests) fails when
a cited key is not in the bibliography, a named function does not exist, or an implemented
paper is not taught by any lesson.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CITE_ROLE = re.compile(r"\{(?:foot)?cite(?::[a-z]+)?\}`([^`]+)`")
HEADING = re.compile(r"^(#{1,4})\s+(.+?)\s*$", re.M)


@dataclass(frozen=True)
class Paper:
    """One bibliography entry with the course's own fields."""

    key: str
    title: str
    authors: list[str]
    year: str
    venue: str
    syllabus: list[int] = field(default_factory=list)
    correction: str = ""
    implemented_by: list[str] = field(default_factory=list)

    @property
    def short(self) -> str:
        """'Han et al. 2016' / 'Yu & Huang 2019' / 'Krishnamoorthi 2018'."""
        last = [a.split(",")[0].strip() for a in self.authors]
        if len(last) == 1:
            names = last[0]
        elif len(last) == 2:
            names = f"{last[0]} & {last[1]}"
        else:
            names = f"{last[0]} et al."
        return f"{names} {self.year}"


@dataclass(frozen=True)
class Citation:
    """A place where a lesson cites a key: the notebook and the section heading above it."""

    notebook: str
    section: str
    cell: int


def _split(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,;]", value) if v.strip()]


def _strip_braces(text: str) -> str:
    return re.sub(r"[{}]", "", text).replace("\\'e", "é").replace("\\", "")


def load_bibliography(path: str | Path | None = None) -> dict[str, Paper]:
    """Parse ``references.bib`` (default: the repository's) into :class:`Paper` objects."""
    from pybtex.database import parse_file

    path = Path(path) if path is not None else ROOT / "references.bib"
    if not path.exists():
        raise FileNotFoundError(f"bibliography not found: {path}")
    data = parse_file(str(path))
    papers: dict[str, Paper] = {}
    for key, entry in data.entries.items():
        f = entry.fields
        authors = [str(p) for p in entry.persons.get("author", [])]
        venue = f.get("booktitle") or f.get("journal") or f.get("howpublished") or ""
        papers[key] = Paper(
            key=key,
            title=_strip_braces(f.get("title", "")),
            authors=[_strip_braces(a) for a in authors],
            year=f.get("year", ""),
            venue=_strip_braces(venue),
            syllabus=[int(c) for c in _split(f.get("syllabus", ""))],
            correction=f.get("correction", ""),
            implemented_by=_split(f.get("implemented_by", "")),
        )
    return papers


def lesson_citations(root: str | Path | None = None) -> dict[str, list[Citation]]:
    """Every ``{cite}``/``{footcite}`` key in the lessons' Markdown, with the section it is in."""
    root = Path(root) if root is not None else ROOT
    found: dict[str, list[Citation]] = {}
    for nb_path in sorted((root / "lessons").glob("*.ipynb")):
        cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
        section = ""
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "markdown":
                continue
            text = "".join(cell["source"])
            # a cite belongs to the last heading above it (in this cell or an earlier one)
            marks = [(m.start(), m.group(2)) for m in HEADING.finditer(text)]
            for m in CITE_ROLE.finditer(text):
                above = [h for pos, h in marks if pos < m.start()]
                where = above[-1] if above else section
                for key in _split(m.group(1)):
                    found.setdefault(key, []).append(Citation(nb_path.stem, where, i))
            if marks:
                section = marks[-1][1]
    return found


def resolve(dotted: str) -> Any:
    """The object named ``utils.module.name``; ``ImportError``/``AttributeError`` when it is absent."""
    if not dotted.startswith("utils."):
        raise ValueError(f"implemented_by must name objects in utils, got {dotted!r}")
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check(root: str | Path | None = None, bib: str | Path | None = None) -> list[str]:
    """Problems that make the bibliography and the code disagree (empty when consistent).

    * a lesson cites a key that ``references.bib`` lacks (it would also break the book build);
    * an ``implemented_by`` name does not exist in ``utils``;
    * a paper implemented in ``utils`` is not cited by any lesson;
    * a syllabus reference is cited by no lesson (once one of its chapters has a lesson).
    """
    root = Path(root) if root is not None else ROOT
    papers = load_bibliography(bib if bib is not None else root / "references.bib")
    cites = lesson_citations(root)
    chapters = {int(p.name[:2]) for p in (root / "lessons").glob("[0-9][0-9]_*.ipynb")}
    problems = []
    for key, places in sorted(cites.items()):
        if key not in papers:
            where = ", ".join(sorted({c.notebook for c in places}))
            problems.append(f"{where}: cites {key!r}, which references.bib does not define")
    for paper in papers.values():
        for name in paper.implemented_by:
            try:
                resolve(name)
            except (ImportError, AttributeError, ValueError) as err:
                problems.append(
                    f"{paper.key}: implemented_by names {name}, which does not exist ({err})"
                )
        if paper.implemented_by and paper.key not in cites:
            problems.append(f"{paper.key}: implemented in utils but cited by no lesson")
        if set(paper.syllabus) & chapters and paper.key not in cites:
            problems.append(f"{paper.key}: a syllabus reference cited by no lesson")
    return problems


def paper_table(root: str | Path | None = None):
    """One row per paper: citation, title, the ``utils`` objects, the lesson sections that cite it."""
    import pandas as pd

    root = Path(root) if root is not None else ROOT
    papers = load_bibliography(root / "references.bib")
    cites = lesson_citations(root)
    rows = []
    for p in sorted(papers.values(), key=lambda p: (p.year, p.key)):
        sections = sorted(
            {
                f"{c.notebook} · {c.section}" if c.section else c.notebook
                for c in cites.get(p.key, [])
            }
        )
        rows.append(
            {
                "key": p.key,
                "paper": p.short,
                "title": p.title,
                "venue": p.venue,
                "syllabus": ", ".join(map(str, p.syllabus)),
                "implemented_by": ", ".join(n.removeprefix("utils.") for n in p.implemented_by),
                "taught_in": "; ".join(sections),
            }
        )
    return pd.DataFrame(rows).set_index("key")
