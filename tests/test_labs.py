"""Lab integrity: labs/ is generated from solutions/, and every check fails on the
student version and passes on the solution."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from utils.labs import MD_STUB, STUB, generate, make_student, strip_code, strip_markdown

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_strip_code_keeps_indentation_and_hints():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    ### HINT: double it\n    return 2 * x\n    ### END SOLUTION\n\ny = 1"
    assert strip_code(src) == (
        f"def f(x):\n    # YOUR CODE HERE\n    # HINT: double it\n    {STUB}\n\ny = 1"
    )


def test_strip_code_rejects_unbalanced_markers():
    with pytest.raises(ValueError, match="without"):
        strip_code("### END SOLUTION")
    with pytest.raises(ValueError, match="without"):
        strip_code("### BEGIN SOLUTION\nx = 1")


def test_strip_markdown_replaces_answer():
    md = "Why?\n<!-- BEGIN SOLUTION -->\nBecause.\n<!-- END SOLUTION -->"
    assert strip_markdown(md) == f"Why?\n{MD_STUB}"


def test_make_student_requires_a_solution_region():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="no '### BEGIN SOLUTION'"):
        make_student(nb)


def test_labs_are_generated_from_solutions():
    assert SOLUTIONS, "solutions/ holds no notebook"
    stale = generate(ROOT, check=True)
    assert stale == [], f"labs/ is out of date, run `python -m utils.labs`: {stale}"


def _check_cells(nb: nbformat.NotebookNode) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if "check" in c.get("metadata", {}).get("tags", [])]


def _execute(nb: nbformat.NotebookNode, folder: Path) -> nbformat.NotebookNode:
    client = NotebookClient(
        nb,
        timeout=600,
        startup_timeout=300,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(folder)}},
    )
    client.execute()
    return nb


def _errored(cell: nbformat.NotebookNode) -> bool:
    return any(o.get("output_type") == "error" for o in cell.get("outputs", []))


def _error_text(cell: nbformat.NotebookNode) -> str:
    return "; ".join(
        f"{o.get('ename')}: {o.get('evalue')}"
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    )


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_checks_pass_on_solution_and_fail_on_student_version(path: Path):
    solution = nbformat.read(path, as_version=4)
    checks = _check_cells(solution)
    assert checks, f"{path.name} has no cell tagged 'check'"

    student = make_student(solution)
    for cell in student.cells:  # the stubs are valid Python
        if cell.cell_type == "code":
            ast.parse(
                "\n".join(
                    ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))
                )
            )

    ran = _execute(solution, path.parent)
    failed = {
        i: _error_text(c) for i, c in enumerate(ran.cells) if c.cell_type == "code" and _errored(c)
    }
    assert failed == {}, f"{path.name}: solution cells raised {failed}"

    ran_student = _execute(student, ROOT / "labs")
    passing = [i for i in checks if not _errored(ran_student.cells[i])]
    assert passing == [], (
        f"{path.name}: check cells {passing} pass on the untouched student version"
    )
