"""Parallel inference across processes with ``torch.distributed`` (chapter 10.2).

Past one device, inference scales out in two ways, both run here on the CPU with
the gloo backend (NCCL takes its place between GPUs), 2 processes × 1 thread:

* **Data parallel**: every process holds the whole model and runs its shard of the
  batch; ``all_gather`` collects the outputs.
* **Pipeline parallel** (GPipe, Huang et al. 2019): the layers are split into two
  stages, one per process; the batch is cut into micro-batches, and stage 0 sends
  each micro-batch's activations to stage 1 (``isend``/``recv``) while it works on
  the next, so both processes are busy once the pipeline is full.

:func:`parallel_inference` runs both in one ``torch.multiprocessing.spawn`` and
times them with the course's measurement policy (:func:`utils.benchmark.time_callable`:
warm-up, then repeats; every call ends with a barrier so a timing covers both
processes); the caller compares the outputs with one process's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from utils.benchmark import Latency, summarize, time_callable
from utils.validation import check_int, check_module, check_tensor


@dataclass
class ParallelResult:
    """Outputs (gathered on the parent) and timings (ms, one batch per timing) per mode."""

    outputs: dict[str, Tensor]
    times_ms: dict[str, list[float]]
    batch_size: int
    world_size: int

    def latency(self, mode: str) -> Latency:
        """The timings of ``mode`` summarised (median, p10, p90; 1 thread per process)."""
        return summarize(self.times_ms[mode], self.batch_size, 1)

    def throughput(self, mode: str) -> float:
        """Samples per second of ``mode``: ``batch / median latency``."""
        return self.latency(mode).throughput


def as_sequential(model: nn.Module, example: Tensor) -> nn.Sequential:
    """``nn.Sequential`` of ``model``'s children, checked to compute the same as ``model`` on ``example``.

    Works for models whose ``forward`` applies their children in definition order
    (LeNet-5, LeNet-300-100); anything else raises ``ValueError``.
    """
    check_module("model", model)
    check_tensor("example", example)
    seq = nn.Sequential(*model.children()).eval()
    with torch.inference_mode():
        same = torch.allclose(seq(example), model.eval()(example), atol=1e-6)
    if not same:
        raise ValueError(
            "model's forward is not its children in order; pass an nn.Sequential instead"
        )
    return seq


def split_stages(model: nn.Sequential, at: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The two pipeline stages ``model[:at]`` and ``model[at:]``."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"model must be an nn.Sequential (see as_sequential), got {type(model).__name__}"
        )
    check_int("at", at, minimum=1, maximum=len(model) - 1)
    return model[:at], model[at:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, model, inputs, at, micro, warmup, repeats, port, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model.eval()
        shard = inputs.chunk(world)[rank]
        stage0, stage1 = split_stages(model, at)
        chunks = inputs.chunk(micro)
        with torch.inference_mode():
            shapes = [stage0(c).shape for c in chunks] if rank == 1 else []

        def data_parallel() -> Tensor:
            out = model(shard)
            parts = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(parts, out)
            dist.barrier()
            return torch.cat(parts)

        def pipeline() -> Tensor | None:
            result = None
            if rank == 0:
                sends = [dist.isend(stage0(c).contiguous(), dst=1) for c in chunks]
                for s in sends:
                    s.wait()
            else:
                outs = []
                for shape in shapes:
                    buf = torch.empty(shape)
                    dist.recv(buf, src=0)
                    outs.append(stage1(buf))
                result = torch.cat(outs)
            dist.barrier()
            return result

        with torch.inference_mode():
            for name, fn in (("data_parallel", data_parallel), ("pipeline", pipeline)):
                out = fn()
                times = time_callable(fn, warmup=warmup, repeats=repeats)
                if (name == "data_parallel" and rank == 0) or (name == "pipeline" and rank == 1):
                    queue.put((name, out.numpy(), times))  # by value
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _workers_skip_main() -> Iterator[None]:
    """Keep spawned workers from re-running the parent's ``__main__``.

    A spawned child first imports the parent's main module (by name, or by running its
    file). In Jupyter that is harmless, but when a lesson runs as a script (as
    ``tools/cuda_lessons.sh`` does) the child would rerun the whole lesson and fail.
    The workers need nothing from ``__main__`` (:func:`_worker` lives here), so the
    main module's ``__spec__`` and ``__file__`` are hidden while the processes start.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def parallel_inference(
    model: nn.Sequential,
    inputs: Tensor,
    *,
    at: int,
    micro_batches: int = 4,
    world_size: int = 2,
    warmup: int = 2,
    repeats: int = 5,
) -> ParallelResult:
    """Run ``model`` on ``inputs`` data-parallel and as a two-stage pipeline split at layer ``at``.

    ``world_size`` processes (spawned, gloo backend, 1 thread each) hold a copy of
    the model; the batch must split evenly into ``world_size`` shards and into
    ``micro_batches``. Returns the outputs of both modes and their median latency.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"model must be an nn.Sequential (see as_sequential), got {type(model).__name__}"
        )
    check_tensor("inputs", inputs)
    check_int("world_size", world_size, minimum=2, maximum=2)
    check_int("micro_batches", micro_batches, minimum=1)
    check_int("warmup", warmup, minimum=0)
    check_int("repeats", repeats, minimum=1)
    split_stages(model, at)
    n = inputs.shape[0]
    if n % world_size or n % micro_batches:
        raise ValueError(
            f"inputs' batch ({n}) must divide evenly into world_size={world_size} "
            f"and micro_batches={micro_batches}"
        )
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    args = (world_size, model.cpu().eval(), inputs.cpu(), at, micro_batches, warmup, repeats)
    with _workers_skip_main():
        procs = mp.spawn(_worker, args=(*args, _free_port(), queue), nprocs=world_size, join=False)
    results = {}
    finished = False
    while len(results) < 2:
        if not queue.empty():
            name, out, ms = queue.get()
            results[name] = (torch.from_numpy(out), ms)
        elif finished:
            raise RuntimeError("the workers exited without returning both results")
        else:
            finished = procs.join(timeout=0.05)  # re-raises a worker's error
    while not finished:
        finished = procs.join(timeout=0.05)
    return ParallelResult(
        {k: v[0] for k, v in results.items()},
        {k: v[1] for k, v in results.items()},
        n,
        world_size,
    )
