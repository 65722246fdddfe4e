"""Lab integrity: labs/ is generated from solutions/; every check passes on the solution,
fails on the untouched student version, and catches each plausible wrong answer of
``tests/lab_mutants.py`` (the mutation suite).

Each solution notebook is executed once, in a live kernel shared by the pass test and
the mutation test. A mutant re-executes its version of one exercise cell and then the
following cells up to the checks that must catch it; afterwards the original cells are
re-executed so that the next mutant starts from the solution's state.
"""

from __future__ import annotations

import ast
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from lab_mutants import MUTANTS, LabMutant
from nbclient import NotebookClient

from utils.labs import BEGIN, END, MD_STUB, STUB, generate, make_student, strip_code, strip_markdown

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


def test_forbid_makes_every_alias_of_a_reference_raise():
    from utils import quantization as ref
    from utils.labs import forbid
    from utils.quantization import qrange

    with forbid(ref, allow=("calc_qparams",)):
        with pytest.raises(AssertionError, match="reference `qrange`"):
            qrange(8, True)
        with pytest.raises(AssertionError, match="reference `qrange`"):
            ref.qrange(8, True)
        ref.calc_qparams(-1.0, 1.0)  # allowed names still work
    assert qrange(8, True) == (-128, 127)  # restored
    with pytest.raises(TypeError, match="modules, classes or functions"):
        with forbid(42):
            pass


def test_labs_are_generated_from_solutions():
    assert SOLUTIONS, "solutions/ holds no notebook"
    stale = generate(ROOT, check=True)
    assert stale == [], f"labs/ is out of date, run `python -m utils.labs`: {stale}"


def _check_cells(nb: nbformat.NotebookNode) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if "check" in c.get("metadata", {}).get("tags", [])]


def _client(nb: nbformat.NotebookNode, folder: Path) -> NotebookClient:
    return NotebookClient(
        nb,
        timeout=600,
        startup_timeout=300,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(folder)}},
    )


def _errored(cell: nbformat.NotebookNode) -> bool:
    return any(o.get("output_type") == "error" for o in cell.get("outputs", []))


def _error_text(cell: nbformat.NotebookNode) -> str:
    return "; ".join(
        f"{o.get('ename')}: {o.get('evalue')}"
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    )


@dataclass
class LiveLab:
    """A solution notebook executed once, with its kernel still running."""

    path: Path
    nb: nbformat.NotebookNode
    client: NotebookClient
    errors: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # nbclient stores each executed cell back into the notebook: keep the solution apart
        self.solution = copy.deepcopy(self.nb)

    def run(self, index: int, source: str | None = None) -> str | None:
        """Execute cell ``index`` (with ``source`` instead of its own); return its error or None."""
        original = self.solution.cells[index]
        cell = nbformat.v4.new_code_cell(original.source if source is None else source)
        cell.metadata = copy.deepcopy(original.metadata)
        self.client.execute_cell(cell, index)
        return _error_text(cell) if _errored(cell) else None

    def cell_index(self, marker: str) -> int:
        """The one code cell whose source contains ``marker``."""
        found = [
            i
            for i, c in enumerate(self.solution.cells)
            if c.cell_type == "code" and marker in c.source
        ]
        assert len(found) == 1, f"{self.path.name}: marker {marker!r} is in code cells {found}"
        return found[0]


@pytest.fixture(scope="module", params=SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def live_lab(request):
    path = request.param
    nb = nbformat.read(path, as_version=4)
    client = _client(nb, path.parent)
    with client.setup_kernel():
        lab = LiveLab(path, nb, client)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                error = lab.run(i)
                if error:
                    lab.errors[i] = error
        yield lab


def test_checks_pass_on_solution_and_fail_on_student_version(live_lab: LiveLab):
    path, solution = live_lab.path, live_lab.solution
    checks = _check_cells(solution)
    assert checks, f"{path.name} has no cell tagged 'check'"
    assert live_lab.errors == {}, f"{path.name}: solution cells raised {live_lab.errors}"

    student = make_student(solution)
    for cell in student.cells:  # the stubs are valid Python
        if cell.cell_type == "code":
            ast.parse(
                "\n".join(
                    ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))
                )
            )
    ran_student = _client(student, ROOT / "labs").execute()
    passing = [i for i in checks if not _errored(ran_student.cells[i])]
    assert passing == [], (
        f"{path.name}: check cells {passing} pass on the untouched student version"
    )


def _solution_spans(source: str) -> list[tuple[int, int]]:
    """Character spans of the solution regions of a cell."""
    spans, start = [], 0
    while (begin := source.find(BEGIN, start)) >= 0:
        end = source.index(END, begin)
        spans.append((begin, end))
        start = end
    return spans


def _mutate(source: str, mutant: LabMutant) -> str:
    assert source.count(mutant.old) == 1, (
        f"mutant {mutant.name!r}: {mutant.old!r} occurs {source.count(mutant.old)} times"
    )
    at = source.index(mutant.old)
    assert any(b <= at and at + len(mutant.old) <= e for b, e in _solution_spans(source)), (
        f"mutant {mutant.name!r} changes given code, not the solution region"
    )
    return source.replace(mutant.old, mutant.new)


def _try_mutant(lab: LiveLab, mutant: LabMutant) -> str | None:
    """Run one mutant; return the failing check's error (caught) or None (survived)."""
    index = lab.cell_index(mutant.cell)
    last = lab.cell_index(mutant.until) if mutant.until else None
    checks = _check_cells(lab.solution)
    if last is None:  # the exercise's checks: the run of check cells after the cell
        later = [i for i in checks if i > index]
        assert later, f"mutant {mutant.name!r}: no check cell after cell {index}"
        code = [i for i, c in enumerate(lab.solution.cells) if c.cell_type == "code"]
        last = later[0]
        while (nxt := code.index(last) + 1) < len(code) and code[nxt] in checks:
            last = code[nxt]
    caught, ran = None, index
    try:
        error = lab.run(index, _mutate(lab.solution.cells[index].source, mutant))
        assert error is None, f"mutant {mutant.name!r} does not run: {error}"
        for i in range(index + 1, last + 1):
            if lab.solution.cells[i].cell_type != "code":
                continue
            ran = i
            error = lab.run(i)
            if error and i in checks:
                caught = f"cell {i}: {error}"
                break
            assert error is None, f"mutant {mutant.name!r} crashes given cell {i}: {error}"
    finally:  # back to the solution's state for the next mutant
        for i in range(index, ran + 1):
            if lab.solution.cells[i].cell_type == "code":
                error = lab.run(i)
                assert error is None, f"restoring cell {i} after {mutant.name!r} failed: {error}"
    return caught


def test_checks_catch_every_mutant(live_lab: LiveLab):
    mutants = MUTANTS[live_lab.path.stem]
    assert len(mutants) >= 10, f"{live_lab.path.stem}: only {len(mutants)} mutants"
    assert live_lab.errors == {}, "the solution itself fails; see the pass test"
    survivors, report = [], []
    for mutant in mutants:
        caught = _try_mutant(live_lab, mutant)
        report.append(f"{'caught' if caught else 'SURVIVED'}: {mutant.name} -> {caught}")
        if caught is None:
            survivors.append(mutant.name)
    if os.environ.get("LAB_MUTANTS_REPORT"):
        Path(os.environ["LAB_MUTANTS_REPORT"]).open("a").write(
            f"## {live_lab.path.stem}: {len(mutants) - len(survivors)}/{len(mutants)} caught\n"
            + "\n".join(report)
            + "\n"
        )
    assert survivors == [], (
        f"{live_lab.path.stem}: {len(survivors)} of {len(mutants)} mutants pass every check: "
        f"{survivors}"
    )
