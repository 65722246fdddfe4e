"""Mutants of utils/cache.py (and the cache key of utils.distillation.cached_generator).

Last run (2026-11-27, tests as below): 12/12 killed, none marked equivalent.
"""

from mutate import Mutant

# the tests of test_foundation.py that guard this module, fastest first (pytest -x stops early)
TESTS = [
    f"tests/test_foundation.py::{name}"
    for name in (
        "test_config_key_is_stable_and_sensitive",
        "test_baseline_config_keys_every_field",
        "test_cached_generator_keys_every_argument",
        "test_cached_state_trains_once_and_retrains_corrupt_files",
        "test_load_baseline_trains_like_fit_with_its_config",
        "test_load_baseline_is_cached",
    )
]
F = "utils/cache.py"
D = "utils/distillation.py"
MUTANTS = [
    Mutant(
        "key ignores lr", F, '        "lr": lr,\n        "model_kwargs"', '        "model_kwargs"'
    ),
    Mutant(
        "key ignores train_fraction",
        F,
        '        "train_fraction": train_fraction,\n        "lr": lr,',
        '        "lr": lr,',
    ),
    Mutant(
        "key ignores the model's arguments (width, channels)",
        F,
        '        "model_kwargs": model_kwargs,\n',
        "",
    ),
    Mutant(
        "key ignores the seed", F, '        "seed": seed,\n        "epochs"', '        "epochs"'
    ),
    Mutant("key ignores CACHE_VERSION", F, '{"v": CACHE_VERSION, **config}', "config"),
    Mutant("key depends on dict order", F, "sort_keys=True", "sort_keys=False"),
    Mutant(
        "loaded model left in train mode",
        F,
        "            model.eval()\n            return model, path, False",
        "            return model, path, False",
    ),
    Mutant(
        "baseline trained at the default lr",
        F,
        'epochs=config["epochs"], lr=lr,',
        'epochs=config["epochs"], lr=1e-3,',
    ),
    Mutant(
        "baseline data order ignores the seed",
        F,
        "make_loader(splits.train, 64, shuffle=True, seed=seed)",
        "make_loader(splits.train, 64, shuffle=True, seed=0)",
    ),
    Mutant("baseline_accuracy ignores split", F, "getattr(s, split)", "s.test"),
    Mutant("generator key ignores channels", D, '        "channels": channels,\n', ""),
    Mutant("generator key ignores batch size", D, '        "batch_size": batch_size,\n', ""),
]
