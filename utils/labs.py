"""Generate the student lab notebooks from the solution notebooks (one source, like nbgrader).

In ``solutions/*.ipynb`` a solution region in a code cell is marked::

    ### BEGIN SOLUTION
    ### HINT: one line that helps
    ...the solution...
    ### END SOLUTION

and becomes, in ``labs/*.ipynb``, at the same indentation::

    # YOUR CODE HERE
    # HINT: one line that helps
    raise NotImplementedError("exercise: write this part")

In Markdown cells, ``<!-- BEGIN SOLUTION -->`` … ``<!-- END SOLUTION -->`` becomes
a prompt for a written answer. Outputs are cleared. Usage::

    python -m utils.labs            # (re)write labs/ from solutions/
    python -m utils.labs --check    # exit 1 when labs/ differs from what would be generated

Check cells use :func:`forbid` to prove that an exercise is answered by the student's own
code and not by a call to the course's reference implementation that the lab imports
to compare with.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, FunctionType, ModuleType

import nbformat

BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "### HINT:"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
STUB = 'raise NotImplementedError("exercise: write this part")'
MD_STUB = "*(在这里写下你的回答 / write your answer here)*"
ROOT = Path(__file__).resolve().parent.parent


def strip_code(source: str) -> str:
    """Replace every marked solution region of a code cell by a stub with its hints."""
    out: list[str] = []
    inside = False
    indent = ""
    for lineno, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"line {lineno}: nested '{BEGIN}'")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
        elif stripped == END:
            if not inside:
                raise ValueError(f"line {lineno}: '{END}' without '{BEGIN}'")
            out.append(f"{indent}{STUB}")
            inside = False
        elif inside:
            if stripped.startswith(HINT):
                out.append(f"{indent}# HINT:{stripped[len(HINT) :]}")
        else:
            out.append(line)
    if inside:
        raise ValueError(f"'{BEGIN}' without '{END}'")
    return "\n".join(out)


def strip_markdown(source: str) -> str:
    """Replace Markdown solution regions by a prompt for the student's answer."""
    pattern = re.compile(re.escape(MD_BEGIN) + r".*?" + re.escape(MD_END), re.S)
    if source.count(MD_BEGIN) != source.count(MD_END):
        raise ValueError("unbalanced Markdown solution markers")
    return pattern.sub(MD_STUB, source)


def has_solution(nb: nbformat.NotebookNode) -> bool:
    """True when some cell of ``nb`` holds a solution region."""
    return any(BEGIN in c.source or MD_BEGIN in c.source for c in nb.cells)


def make_student(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Return the student version of a solution notebook (outputs cleared)."""
    if not has_solution(nb):
        raise ValueError("the notebook has no '### BEGIN SOLUTION' region")
    student = copy.deepcopy(nb)
    for cell in student.cells:
        if cell.cell_type == "code":
            cell.source = strip_code(cell.source)
            cell.outputs, cell.execution_count = [], None
        elif cell.cell_type == "markdown":
            cell.source = strip_markdown(cell.source)
    return student


def render(nb: nbformat.NotebookNode) -> str:
    """Serialise a notebook the way the repository stores it."""
    return nbformat.writes(nb) + "\n"


def generate(root: Path = ROOT, check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) ``labs/X.ipynb`` for every ``solutions/X.ipynb``.

    Returns the names of the lab notebooks that were (or would be) changed, and of
    stray lab notebooks that have no solution.
    """
    changed = []
    labs = root / "labs"
    labs.mkdir(exist_ok=True)
    sources = sorted((root / "solutions").glob("*.ipynb"))
    for src in sources:
        student = render(make_student(nbformat.read(src, as_version=4)))
        dst = labs / src.name
        if not dst.exists() or dst.read_text(encoding="utf-8") != student:
            changed.append(dst.name)
            if not check:
                dst.write_text(student, encoding="utf-8")
    stray = {p.name for p in labs.glob("*.ipynb")} - {p.name for p in sources}
    return changed + sorted(stray)


# Original code of the functions that :func:`forbid` has switched off, by ``id`` of the function.
_ORIGINALS: dict[int, FunctionType] = {}
# Frames of these packages (decorators, context managers) are skipped when finding the caller.
_WRAPPER_PACKAGES = ("torch", "functools", "contextlib")


def _caller_is_inside(module_globals: dict) -> bool:
    """True when the caller of the forbidden function is code of the same module.

    The reference may use its own helpers; only calls from elsewhere (the student's
    notebook) are forbidden. Frames of decorators (``torch.no_grad``, ``functools``)
    between the two are skipped.
    """
    frame = sys._getframe(2)
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith(
        _WRAPPER_PACKAGES
    ):
        frame = frame.f_back
    return frame is not None and frame.f_globals is module_globals


def _raiser_code(f: FunctionType) -> CodeType:
    """Code for ``f`` that runs the original from inside its module and raises elsewhere."""
    message = (
        f"your code called the course's reference `{f.__qualname__}`: "
        "this exercise asks you to write that part yourself"
    )
    _ORIGINALS[id(f)] = FunctionType(
        f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__
    )
    _ORIGINALS[id(f)].__kwdefaults__ = f.__kwdefaults__
    source = (
        "def _forbidden(*args, **kwargs):\n"
        "    import sys\n"
        "    labs = sys.modules['utils.labs']\n"
        "    if labs._caller_is_inside(globals()):\n"
        f"        return labs._ORIGINALS[{id(f)}](*args, **kwargs)\n"
        f"    raise AssertionError({message!r})\n"
    )
    namespace: dict = {}
    exec(source, namespace)
    return namespace["_forbidden"].__code__


def _forbidden_functions(target: object, allow: set[str]) -> list[FunctionType]:
    """The plain functions that ``target`` (a module, class or function) stands for."""
    if isinstance(target, ModuleType):
        found = []
        for name, obj in vars(target).items():
            if name in allow or getattr(obj, "__module__", None) != target.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found += _forbidden_functions(obj, allow)
        return found
    if inspect.isclass(target):
        return [
            inspect.unwrap(f)
            for name, f in vars(target).items()
            if inspect.isfunction(f) and name not in allow
        ]
    if inspect.isfunction(target):
        return [inspect.unwrap(target)]
    raise TypeError(f"targets must be modules, classes or functions, got {type(target).__name__}")


@contextmanager
def forbid(*targets: object, allow: tuple[str, ...] = ()) -> Iterator[None]:
    """Inside the block, every function of ``targets`` raises ``AssertionError``.

    ``targets`` are modules (all functions and methods of classes defined there),
    classes (their methods) or functions; names in ``allow`` stay usable, and so do
    calls from inside the module itself (the reference's own helpers). The code
    object of each function is swapped, so every alias (``ref.quantize``, ``from
    utils.quantization import quantize``) is caught. A check cell wraps the call of
    the student's function in it::

        with forbid(ref):
            ours = my_quantize(x, scale, zero_point)
    """
    functions = []
    for target in targets:
        functions += _forbidden_functions(target, set(allow))
    saved = []
    try:
        for f in dict.fromkeys(functions):
            if f.__code__.co_freevars:  # a closure cannot take another code object
                continue
            saved.append((f, f.__code__))
            f.__code__ = _raiser_code(f)
        yield
    finally:
        for f, code in saved:
            f.__code__ = code
            _ORIGINALS.pop(id(f), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate labs/ from solutions/.")
    ap.add_argument(
        "--check", action="store_true", help="only report labs that differ; exit 1 if any"
    )
    args = ap.parse_args(argv)
    changed = generate(check=args.check)
    for name in changed:
        print(("differs: " if args.check else "wrote: ") + f"labs/{name}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
