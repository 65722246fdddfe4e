"""Mutants of ``utils/compat.py``: how a cell is judged.

Last run (2026-11-27): 5/5 killed (4/5 end to end, then the dynamic-INT8 one after its test was added)."""

from mutate import Mutant

F = "utils/compat.py"
TESTS = ["tests/test_compat.py"]

MUTANTS = [
    Mutant(
        "tolerance test reversed", F, "if err > TOLERANCE[scheme]:", "if err < TOLERANCE[scheme]:"
    ),
    Mutant(
        "fallback never reported",
        F,
        '    if integer_kernel is False:\n        return "falls back to float"\n',
        "",
    ),
    Mutant(
        "dynamic: any quantized layer counts",
        F,
        "kernel = bool(dynamic) and not float_left",
        "kernel = bool(dynamic)",
    ),
    Mutant(
        "kinds mixed up",
        F,
        'for kind in ("works", "falls back to float", "fails", "wrong"):',
        'for kind in ("works", "fails", "wrong"):',
    ),
    Mutant(
        "errors swallowed as works",
        F,
        'return "fails: " + (text if len(text) <= 90 else text[:87] + "…")',
        'return "works"',
    ),
]
