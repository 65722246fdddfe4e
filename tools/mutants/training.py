"""Mutants of utils/training.py: the one training loop and the evaluation loop.

Last run (2026-11-27, tests as below): 16/16 killed, none marked equivalent.
"""

from mutate import Mutant

# the tests of test_foundation.py that guard this module, fastest first (pytest -x stops early)
TESTS = [
    f"tests/test_foundation.py::{name}"
    for name in (
        "test_fit_sgd_is_momentum_sgd_under_a_cosine_schedule",
        "test_fit_adam_first_step_moves_each_weight_by_lr",
        "test_fit_trains_only_params_and_uses_the_default_cross_entropy",
        "test_evaluate_hand_values_and_restores_the_mode",
        "test_fit_leaves_the_model_on_its_device_in_eval_mode",
        "test_fit_bad_input",
        "test_fit_records_validation_accuracy_and_hooks",
        "test_fit_learns_and_is_deterministic",
    )
]
F = "utils/training.py"
MUTANTS = [
    Mutant("no LR schedule", F, "            sched.step()\n", ""),
    Mutant(
        "no zero_grad: gradients accumulate", F, "            opt.zero_grad(set_to_none=True)\n", ""
    ),
    Mutant(
        "epoch loss = last batch loss",
        F,
        '"train_loss": loss_sum / max(seen, 1)',
        '"train_loss": loss.item()',
    ),
    Mutant(
        "epoch loss = mean of batch means (unweighted)",
        F,
        "loss_sum += loss.item() * len(y)\n            seen += len(y)",
        "loss_sum += loss.item()\n            seen += 1",
    ),
    Mutant("model left in train mode after fit", F, "model.eval().to(home)", "model.to(home)"),
    Mutant(
        "evaluate in train mode",
        F,
        "    model.eval()\n    logits, labels = [], []",
        "    logits, labels = [], []",
    ),
    Mutant("evaluate does not restore the mode", F, "model.train(was_training)", "model.eval()"),
    Mutant(
        "after_step also before the optimiser step",
        F,
        "            loss.backward()\n            opt.step()",
        "            loss.backward()\n            if after_step is not None:\n"
        "                after_step(model)\n            opt.step()",
    ),
    Mutant("SGD without momentum", F, "momentum=0.9, weight_decay", "momentum=0.0, weight_decay"),
    Mutant(
        "SGD ignores weight decay",
        F,
        "momentum=0.9, weight_decay=weight_decay)",
        "momentum=0.9)",
    ),
    Mutant("adam and sgd swapped", F, 'if optimizer == "adam":', 'if optimizer != "adam":'),
    Mutant(
        "params argument ignored",
        F,
        "trainable = params if params is not None else",
        "trainable = None or",
    ),
    Mutant(
        "cosine schedule restarts every epoch",
        F,
        "total = max(1, epochs * len(train_loader))",
        "total = max(1, len(train_loader))",
    ),
    Mutant(
        "validation accuracy measured on the training loader",
        F,
        'evaluate(model, val_loader, device=device)["accuracy"]',
        'evaluate(model, train_loader, device=device)["accuracy"]',
    ),
    Mutant(
        "error count counts the right answers",
        F,
        "(logits.argmax(1) != labels).sum()",
        "(logits.argmax(1) == labels).sum()",
    ),
    Mutant(
        "loss is the sum over the batch",
        F,
        "    return F.cross_entropy(model(x), y)",
        '    return F.cross_entropy(model(x), y, reduction="sum")',
    ),
]
