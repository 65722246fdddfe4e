"""Mutants of utils/data.py: seeded stratified splits and loaders.

Last run (2026-11-27, tests as below): 11/11 killed, none marked equivalent.
"""

from mutate import Mutant

# the tests of test_foundation.py that guard this module, fastest first (pytest -x stops early)
TESTS = [
    f"tests/test_foundation.py::{name}"
    for name in (
        "test_make_loader_order_is_fixed_by_the_seed",
        "test_make_loader_bad_input",
        "test_load_splits_bad_input",
        "test_digits_split_depends_on_the_seed_only",
        "test_digits_and_train_fraction",
        "test_loaders_are_reproducible",
        "test_splits_partition_the_data_set_by_class",
        "test_mnist5k_splits_are_stratified_seeded_and_disjoint",
    )
]
F = "utils/data.py"
MUTANTS = [
    Mutant(
        "validation split overlaps the training split",
        F,
        "parts[1] += idx[n_train : n_train + n_val].tolist()",
        "parts[1] += idx[:n_val].tolist()",
    ),
    Mutant(
        "test split overlaps the validation split",
        F,
        "parts[2] += idx[n_train + n_val :].tolist()",
        "parts[2] += idx[n_train:].tolist()",
    ),
    Mutant(
        "split ignores the seed",
        F,
        "rng = np.random.default_rng(seed)",
        "rng = np.random.default_rng(0)",
    ),
    Mutant(
        "validation sized by the test fraction",
        F,
        "n_val = round(len(idx) * fractions[1])",
        "n_val = round(len(idx) * fractions[2])",
    ),
    Mutant("train_fraction ignored", F, "tr = tr[np.sort(keep)]", "tr = tr"),
    Mutant(
        "train subset drawn from the whole data set, not the training split",
        F,
        "tr = tr[np.sort(keep)]",
        "tr = np.sort(keep)",
    ),
    Mutant(
        "loader order ignores the seed",
        F,
        "torch.Generator().manual_seed(seed) if shuffle else None",
        "torch.Generator().manual_seed(0) if shuffle else None",
    ),
    Mutant(
        "validation loader shuffled",
        F,
        "        make_loader(s.val, batch_size),",
        "        make_loader(s.val, batch_size, shuffle=True),",
    ),
    Mutant(
        "load_loaders ignores train_fraction",
        F,
        "s = load_splits(name, seed=seed, train_fraction=train_fraction)",
        "s = load_splits(name, seed=seed)",
    ),
    Mutant(
        "load_loaders shuffles with seed 0",
        F,
        "make_loader(s.train, batch_size, shuffle=True, seed=seed)",
        "make_loader(s.train, batch_size, shuffle=True, seed=0)",
    ),
    Mutant(
        "MNIST not normalised",
        F,
        "x = (x.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD",
        "x = x.astype(np.float32) / 255.0",
    ),
]
