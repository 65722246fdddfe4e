"""Mutation testing of ``utils``: does each module's test file catch small, plausible bugs?

A mutant is one textual change to one file of ``utils`` (``old`` → ``new``, where ``old``
must occur exactly once). Mutants live in ``tools/mutants/<module>.py`` as

    TESTS = ["tests/test_quantization.py"]
    MUTANTS = [
        Mutant("round down instead of half-to-even", "utils/quantization.py",
               "torch.round(x / scale)", "torch.floor(x / scale)"),
    ]

A spec imports the class with ``from mutate import Mutant`` (``tools/`` is on the path
when the runner runs). For every mutant the runner copies the repository (without .venv, caches and build
output) to a temporary folder, applies the change there — the working tree is never
touched, so it is safe while you edit — and runs the module's tests with ``pytest -x``.
A mutant is *killed* when the tests fail. The report lists survivors so that each is
either caught by a new test or explained as equivalent (``equivalent=True`` with a reason).

Usage (on demand, not in CI; minutes per module on 2 cores)::

    python tools/mutate.py                    # every module with a spec
    python tools/mutate.py quantization pruning
    python tools/mutate.py quantization -k floor   # only mutants whose name contains "floor"
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "tools" / "mutants"
IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    ".cache",
    "_build",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.egg-info",
    "lessons",
    "labs",
    "solutions",
)


@dataclass(frozen=True)
class Mutant:
    """One plausible bug: replace ``old`` (which must occur once in ``path``) by ``new``."""

    name: str
    path: str
    old: str
    new: str
    equivalent: bool = False  # True: no test can tell it apart; say why in ``name``


def load_spec(module: str) -> tuple[list[str], list[Mutant]]:
    """Read ``TESTS`` and ``MUTANTS`` from ``tools/mutants/<module>.py``."""
    path = SPECS / f"{module}.py"
    if not path.exists():
        known = sorted(p.stem for p in SPECS.glob("*.py") if p.stem != "__init__")
        raise SystemExit(f"no mutant spec {path}; known modules: {known}")
    spec = importlib.util.spec_from_file_location(f"mutants_{module}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.TESTS), list(mod.MUTANTS)


def _run_tests(workdir: Path, tests: list[str], timeout: int) -> tuple[bool, str]:
    path = os.pathsep.join(filter(None, [str(workdir), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        out = subprocess.run(
            cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, "timeout"
    tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or [""]
    return out.returncode == 0, tail[0]


def run_module(module: str, only: str | None, timeout: int) -> tuple[int, int, list[str]]:
    """Run every mutant of ``module``; return (killed, meaningful total, survivor names).

    Mutants marked ``equivalent`` that survive are left out of the total."""
    tests, mutants = load_spec(module)
    if only:
        mutants = [m for m in mutants if only in m.name]
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        base = Path(tmp) / "repo"
        shutil.copytree(ROOT, base, ignore=IGNORE)
        ok, tail = _run_tests(base, tests, timeout)
        if not ok:
            raise SystemExit(f"[{module}] the unmutated tests fail, fix them first: {tail}")
        killed, survivors = 0, []
        for m in mutants:
            target = base / m.path
            original = target.read_text()
            count = original.count(m.old)
            if count != 1:
                raise SystemExit(
                    f"[{module}] mutant {m.name!r}: `old` occurs {count} times in {m.path}"
                )
            target.write_text(original.replace(m.old, m.new))
            t0 = time.time()
            try:
                passed, tail = _run_tests(base, tests, timeout)
            finally:
                target.write_text(original)
            status = "SURVIVED" if passed else "killed"
            if passed and m.equivalent:
                status = "equivalent"
            print(f"[{module}] {status:10s} {time.time() - t0:5.1f}s  {m.name}", flush=True)
            if passed and not m.equivalent:
                survivors.append(m.name)
            killed += not passed
    equivalent = sum(1 for m in mutants if m.equivalent)
    return killed, len(mutants) - equivalent, survivors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "modules", nargs="*", help="modules with a spec in tools/mutants/ (default: all)"
    )
    parser.add_argument("-k", dest="only", help="only mutants whose name contains this text")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test run")
    args = parser.parse_args()
    modules = args.modules or sorted(p.stem for p in SPECS.glob("*.py") if p.stem != "__init__")
    summary = []
    for module in modules:
        killed, total, survivors = run_module(module, args.only, args.timeout)
        summary.append((module, killed, total, survivors))
    print("\nmodule          killed/total  score")
    for module, killed, total, survivors in summary:
        score = 100.0 * killed / total if total else 0.0
        print(f"{module:15s} {killed:4d}/{total:<4d}     {score:5.1f}%")
        for name in survivors:
            print(f"    survived: {name}")


if __name__ == "__main__":
    main()
