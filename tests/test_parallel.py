"""Tests of utils.parallel: distributed (gloo, 2 processes) inference equals one process.

One spawn of two processes serves every assertion (module-scoped fixture): starting the
processes is what costs time (~5 s on an idle 2-core machine), so there is only one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from utils.models import LeNet300100
from utils.parallel import as_sequential, parallel_inference, split_stages


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = LeNet300100()
    x = torch.randn(16, 1, 28, 28)
    seq = as_sequential(model, x[:2])
    result = parallel_inference(seq, x, at=3, micro_batches=4, warmup=1, repeats=2)
    with torch.inference_mode():
        ref = seq(x)
    return result, ref


def test_distributed_outputs_equal_single_process(setup):
    result, ref = setup
    assert set(result.outputs) == {"data_parallel", "pipeline"}
    for mode, out in result.outputs.items():
        assert out.shape == ref.shape, mode
        assert torch.allclose(out, ref, atol=1e-5), mode


def test_throughput_measured(setup):
    result, _ = setup
    for mode in ("data_parallel", "pipeline"):
        lat = result.latency(mode)
        assert lat.median_ms > 0 and lat.repeats == 2 and lat.batch_size == 16
        assert result.throughput(mode) == pytest.approx(16_000 / lat.median_ms)


def test_split_and_bad_input():
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    a, b = split_stages(seq, 2)
    assert list(a) == [seq[0], seq[1]] and list(b) == [seq[2]]  # layers [:at] and [at:]
    x = torch.randn(3, 4)
    assert torch.equal(b(a(x)), seq(x))
    with pytest.raises(ValueError, match="at must be <= 2"):
        split_stages(seq, 3)
    with pytest.raises(TypeError, match="nn.Sequential"):
        parallel_inference(nn.Linear(2, 2), torch.ones(2, 2), at=1)
    with pytest.raises(ValueError, match="divide evenly"):
        parallel_inference(seq, torch.ones(6, 4), at=1, micro_batches=4)

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(x) + self.a(x)

    with pytest.raises(ValueError, match="not its children in order"):
        as_sequential(Skip(), x)


def test_workers_do_not_rerun_a_script_main(tmp_path):
    """A lesson run as a script (tools/cuda_lessons.sh) must not be re-run by each spawned worker."""

    script = tmp_path / "lesson.py"
    script.write_text(
        "import torch\n"
        "from utils.models import LeNet300100\n"
        "from utils.parallel import as_sequential, parallel_inference\n"
        "print('MAIN RAN')\n"
        "x = torch.randn(8, 1, 28, 28)\n"
        "seq = as_sequential(LeNet300100(), x[:2])\n"
        "r = parallel_inference(seq, x, at=3, micro_batches=2, warmup=0, repeats=1)\n"
        "print(sorted(r.outputs))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("MAIN RAN") == 1, done.stdout
    assert "data_parallel" in done.stdout and "pipeline" in done.stdout
