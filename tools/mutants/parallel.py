"""Mutants of ``utils/parallel.py``: sharding, gathering, pipeline stages and their order.

Last measured 2026-11-27 with ``tools/mutate.py parallel``: 6/6 killed (the off-by-one split
after ``test_split_and_bad_input`` started checking the stages' layers)."""

from mutate import Mutant

F = "utils/parallel.py"
TESTS = ["tests/test_parallel.py"]

MUTANTS = [
    Mutant(
        "every rank runs the whole batch",
        F,
        "shard = inputs.chunk(world)[rank]",
        "shard = inputs.chunk(world)[0]",
    ),
    Mutant(
        "stage 1 gets stage 0's input, not its output",
        F,
        "sends = [dist.isend(stage0(c).contiguous(), dst=1) for c in chunks]",
        "sends = [dist.isend(stage0(c).contiguous() * 0, dst=1) for c in chunks]",
    ),
    Mutant(
        "split point off by one",
        F,
        "return model[:at], model[at:]",
        "return model[: at - 1], model[at - 1 :]",
    ),
    Mutant("as_sequential check skipped", F, "    if not same:\n", "    if False:\n"),
    Mutant(
        "micro-batch order reversed",
        F,
        "result = torch.cat(outs)",
        "result = torch.cat(outs[::-1])",
    ),
    Mutant(
        "batch divisibility not checked", F, "if n % world_size or n % micro_batches:", "if False:"
    ),
]
