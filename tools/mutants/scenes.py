"""Mutants of utils/scenes.py: boxes, masks, overlap and the train/test separation of the digits.

Last run: see the closing note of the change that last touched this file.
"""

from mutate import Mutant

TESTS = ["tests/test_scenes.py"]
F = "utils/scenes.py"
MUTANTS = [
    Mutant(
        "box x2 inclusive instead of exclusive",
        F,
        "x0 + cols[-1].item() + 1",
        "x0 + cols[-1].item()",
    ),
    Mutant(
        "test scenes built from the train digits",
        F,
        'data = getattr(load_splits("mnist5k", seed=0), split)',
        'data = load_splits("mnist5k", seed=0).train',
    ),
    Mutant(
        "overlap not checked",
        F,
        "if any(_box_iou(box, other) > MAX_OVERLAP for other in boxes):",
        "if False:",
    ),
    Mutant(
        "mask class without the +1 for background",
        F,
        "mask[region][ink] = 1 + int(classes[idx])",
        "mask[region][ink] = int(classes[idx])",
    ),
    Mutant(
        "scenes depend on n (one stream for all)",
        F,
        "np.random.default_rng([seed, stream, i]),",
        "np.random.default_rng([seed, stream, n, i]),",
    ),
    Mutant(
        "digits overwrite instead of max",
        F,
        "image[region] = torch.maximum(image[region], patch)",
        "image[region] = patch",
    ),
    Mutant(
        "always max_digits",
        F,
        "wanted = int(rng.integers(1, max_digits + 1))",
        "wanted = max_digits",
    ),
]
