"""Mutants of utils/data.py: seeded stratified splits and loaders."""

from mutate import Mutant

TESTS = ["tests/test_foundation.py"]
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
