"""utils.references: one bibliography, every citation resolvable, every implemented paper taught."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from utils import references

ROOT = Path(__file__).resolve().parent.parent


def test_the_course_is_consistent():
    assert references.check() == []


def test_the_syllabus_references_are_all_there():
    papers = references.load_bibliography()
    syllabus = [p for p in papers.values() if p.syllabus]
    assert len(syllabus) == 16  # 15 in the syllabus's list + BERT, cited in its chapter 7 section
    assert {c for p in syllabus for c in p.syllabus} == set(range(1, 11))
    assert papers["sun2020mobilebert"].year == "2020"  # the syllabus says 2019
    assert "Networks" in papers["han2015learning"].title  # the syllabus drops the plural


def test_short_citation_forms():
    papers = references.load_bibliography()
    assert papers["krishnamoorthi2018quantizing"].short == "Krishnamoorthi 2018"
    assert papers["yu2019universally"].short == "Yu & Huang 2019"
    assert papers["han2016deep"].short == "Han et al. 2016"


def test_citations_carry_their_section():
    cites = references.lesson_citations()
    places = cites["molchanov2017pruning"]
    assert any(c.notebook == "03_pruning" and "迭代泰勒剪枝" in c.section for c in places)


def test_paper_table_lists_code_and_sections():
    table = references.paper_table()
    row = table.loc["jacob2018quantization"]
    assert "quantization.requantize" in row.implemented_by
    assert "02_quantization" in row.taught_in


def _copy_course(tmp_path: Path) -> Path:
    root = tmp_path / "course"
    (root / "lessons").mkdir(parents=True)
    shutil.copy(ROOT / "references.bib", root / "references.bib")
    for nb in (ROOT / "lessons").glob("*.ipynb"):
        shutil.copy(nb, root / "lessons" / nb.name)
    return root


def _add_markdown(root: Path, text: str) -> None:
    path = root / "lessons" / "01_inference_acceleration_basics.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell(text))
    nbformat.write(nb, path)


def test_a_broken_citation_fails(tmp_path):
    root = _copy_course(tmp_path)
    _add_markdown(root, "## 小节\n\n见 {footcite:p}`nosuch2099paper`。")
    problems = references.check(root)
    assert any("nosuch2099paper" in p and "does not define" in p for p in problems), problems


def test_a_missing_function_fails(tmp_path):
    root = _copy_course(tmp_path)
    bib = root / "references.bib"
    bib.write_text(
        bib.read_text(encoding="utf-8").replace(
            "utils.quantization.requantize", "utils.quantization.requantise"
        ),
        encoding="utf-8",
    )
    problems = references.check(root)
    assert any("utils.quantization.requantise" in p for p in problems), problems


def test_an_implemented_paper_that_no_lesson_teaches_fails(tmp_path):
    root = _copy_course(tmp_path)
    with (root / "references.bib").open("a", encoding="utf-8") as fh:
        fh.write(
            "@article{orphan2020,\n  title = {Orphan},\n  author = {Doe, Jane},\n"
            "  journal = {J},\n  year = {2020},\n"
            "  implemented_by = {utils.quantization.quantize}\n}\n"
        )
    problems = references.check(root)
    assert any("orphan2020" in p and "cited by no lesson" in p for p in problems), problems


def test_resolve_refuses_names_outside_utils():
    with pytest.raises(ValueError, match="objects in utils"):
        references.resolve("os.path.join")
    assert references.resolve("utils.quantization.quantize").__name__ == "quantize"


def test_missing_bibliography_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="bibliography not found"):
        references.load_bibliography(tmp_path / "none.bib")
