"""Mutants of ``utils/compat.py``: how a cell is judged. Not yet measured end to end."""

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
