"""Deep Compression end to end: weight sharing, Huffman coding, a real file format, low rank.

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding", ICLR 2016, chain three stages:

1. pruning (``utils.pruning``) keeps the large weights and fine-tunes;
2. trained quantization (weight sharing): the non-zero weights of each layer are
   clustered by 1-D k-means into at most ``2**bits`` shared values (linear
   initialisation between the smallest and largest weight); each weight stores
   only the index of its cluster, index 0 meaning "zero" (pruned). The shared
   values (centroids) are fine-tuned: the gradient of centroid ``c_k`` is the sum
   of the gradients of the weights in cluster ``k`` (the paper's eq. 3); pruned
   weights stay zero;
3. Huffman coding of the cluster indices and of the relative positions (index
   differences) of the non-zeros.

This module implements each stage on tensors, a binary file format whose size is
the reported size (:func:`save_compressed` / :func:`load_compressed`, lossless in value and
checksummed), truncated-SVD low-rank factorisation (Denton et al. 2014) as a further
stage, and the pipelines that chain the stages with the course's pruning,
quantization and distillation code.
"""

from __future__ import annotations

import copy
import heapq
import json
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from utils.cache import baseline_config, cached_state, load_baseline
from utils.config import seed_everything
from utils.data import load_splits, make_loader
from utils.distillation import make_kd_loss
from utils.pruning import magnitude_prune, make_permanent
from utils.quantization import kmeans_quantize
from utils.training import device_of, fit
from utils.validation import check_float, check_int, check_module, check_tensor, check_type

MAX_SHARED_BITS = 8  # at most 2**8 shared values per layer (the paper's conv layers)

# --------------------------------------------------------------------------------------
# Trained quantization (weight sharing)
# --------------------------------------------------------------------------------------


@dataclass
class SharedWeight:
    """A weight tensor stored as a codebook and indices: ``W = [0, c_1 … c_K][indices]``."""

    centroids: Tensor  # (K,) float32, the shared values
    indices: Tensor  # int64, shape of W; 0 = zero (pruned), k ≥ 1 = centroid k

    def decode(self) -> Tensor:
        """The dense weight ``[0, c_1 … c_K][indices]``."""
        return torch.cat([self.centroids.new_zeros(1), self.centroids])[self.indices]


def share_weight(weight: Tensor, bits: int, *, iters: int = 30) -> SharedWeight:
    """Cluster the non-zero entries of ``weight`` into at most ``2**bits`` shared values.

    The non-zeros are clustered by chapter 2's :func:`utils.quantization.kmeans_quantize`
    (1-D k-means with the paper's linear initialisation, Han et al. 2016, §3.1–3.2);
    the zeros (pruned weights) are not clustered: they get index 0 and stay zero, the
    clusters get indices ``1 … K``. So ``bits`` counts the shared values (the paper's
    "5 bits = 32 shared weights"); the stored index alphabet has one more symbol, the zero.
    The result lies on ``weight``'s device.
    """
    check_tensor("weight", weight, finite=True)
    check_int("bits", bits, minimum=1, maximum=MAX_SHARED_BITS)
    check_int("iters", iters, minimum=1)
    w = weight.detach().cpu().float()
    nz = w != 0
    indices = torch.zeros(w.shape, dtype=torch.long)
    if not nz.any():
        return SharedWeight(torch.zeros(0, device=weight.device), indices.to(weight.device))
    centroids, labels = kmeans_quantize(w[nz], bits, iters)
    indices[nz] = labels + 1
    return SharedWeight(centroids.float().to(weight.device), indices.to(weight.device))


class SharedWeightParametrization(nn.Module):
    """``torch.nn.utils.parametrize`` rule ``centroids ↦ [0, c_1 … c_K][indices]``.

    Registered on a layer's ``weight`` it makes the centroids the trainable tensor
    (``layer.parametrizations.weight.original``). Autograd of the gather sums the
    gradients of all weights of a cluster into its centroid,
    ``∂L/∂c_k = Σ_{ij} ∂L/∂W_ij · 1[I_ij = k]`` (Han et al. 2016, eq. 3), and the
    zero entry is a constant, so pruned weights stay zero.
    """

    def __init__(self, indices: Tensor, num_centroids: int) -> None:
        super().__init__()
        check_tensor("indices", indices)
        check_int("num_centroids", num_centroids, minimum=0)
        self.register_buffer("indices", indices)
        self.num_centroids = num_centroids

    def forward(self, centroids: Tensor) -> Tensor:
        return torch.cat([centroids.new_zeros(1), centroids])[self.indices]

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Least-squares centroids of ``weight``: the mean of each cluster."""
        idx = self.indices.flatten()
        k = self.num_centroids + 1
        sums = torch.zeros(k, dtype=weight.dtype, device=weight.device).index_add_(
            0, idx, weight.flatten()
        )
        counts = torch.bincount(idx, minlength=k).clamp(min=1)
        return (sums / counts)[1:]


def sharable_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` modules (their weights get shared)."""
    check_module("model", model)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _bits_for(name: str, module: nn.Module, bits: int | Mapping[str, int]) -> int:
    if isinstance(bits, Mapping):
        if name in bits:
            return bits[name]
        kind = "conv" if isinstance(module, nn.Conv2d) else "fc"
        if kind in bits:
            return bits[kind]
        raise ValueError(f"bits has no entry for layer {name!r} (nor for {kind!r})")
    return bits


def apply_weight_sharing(
    model: nn.Module, bits: int | Mapping[str, int], *, iters: int = 30
) -> nn.Module:
    """Replace, in place, the weight of every Linear/Conv2d by shared centroids (trainable).

    ``bits`` is one width for all layers or a mapping ``{layer name | "conv" | "fc": bits}``
    (Deep Compression uses 8 bits for conv and 5 for fc layers). Each weight becomes
    a :class:`SharedWeightParametrization` of its k-means centroids, so
    ``utils.training.fit`` fine-tunes the centroids (and the biases) directly. Call
    :func:`remove_weight_sharing` afterwards to get plain weights back.
    """
    check_module("model", model)
    if not isinstance(bits, Mapping):
        check_int("bits", bits, minimum=1, maximum=MAX_SHARED_BITS)
    check_int("iters", iters, minimum=1)
    for name in sharable_layers(model):
        mod = model.get_submodule(name)
        if parametrize.is_parametrized(mod, "weight"):
            raise ValueError(
                f"layer {name!r} is already parametrized; call remove_weight_sharing first"
            )
        b = _bits_for(name, mod, bits)
        check_int(f"bits[{name!r}]", b, minimum=1, maximum=MAX_SHARED_BITS)
        shared = share_weight(mod.weight, b, iters=iters)
        rule = SharedWeightParametrization(
            shared.indices.to(mod.weight.device), shared.centroids.numel()
        )
        parametrize.register_parametrization(mod, "weight", rule, unsafe=True)
    return model


def remove_weight_sharing(model: nn.Module) -> nn.Module:
    """Turn every shared weight back into a plain ``nn.Parameter`` holding ``[0, c][indices]``."""
    check_module("model", model)
    for name in sharable_layers(model):
        mod = model.get_submodule(name)
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return model


def codebook_of(weight: Tensor) -> SharedWeight:
    """Recover ``(centroids, indices)`` of a weight with few distinct values (zeros → index 0).

    ``−0.0`` and ``+0.0`` are the same value, so both get index 0. Computed on the CPU.
    """
    check_tensor("weight", weight)
    w = weight.detach().cpu().float()
    values, inverse = torch.unique(w, return_inverse=True)
    zero = values == 0
    if zero.any():
        z = int(zero.nonzero()[0, 0])
        centroids = torch.cat([values[:z], values[z + 1 :]])
        # index 0 is the zero; the others shift so that they follow the sorted centroids
        indices = torch.where(inverse < z, inverse + 1, inverse)
        indices = torch.where(inverse == z, torch.zeros_like(inverse), indices)
    else:
        centroids, indices = values, inverse + 1
    return SharedWeight(centroids, indices.reshape(w.shape))


# --------------------------------------------------------------------------------------
# Huffman coding and bit packing
# --------------------------------------------------------------------------------------


def huffman_code_lengths(counts: Sequence[int] | np.ndarray) -> list[int]:
    """Code length of each symbol of an optimal prefix code (Huffman 1952).

    Repeatedly merge the two least frequent subtrees; a symbol's length is its depth.
    Ties are broken by the smaller symbol so the code is deterministic. Symbols with
    count 0 get length 0 (no code); a lone used symbol gets length 1. The expected
    length ``Σ p_i ℓ_i`` lies in ``[H, H + 1)``, ``H`` the entropy in bits.
    """
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("counts must be a non-empty 1-D sequence of counts")
    if not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise ValueError("counts must be non-negative integers")
    lengths = [0] * arr.size
    used = [int(i) for i in np.flatnonzero(arr)]
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    heap = [(int(arr[s]), s, [s]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def canonical_codes(lengths: Sequence[int]) -> dict[int, str]:
    """Canonical Huffman codes (as bit strings) from code lengths.

    Symbols sorted by ``(length, symbol)`` get consecutive codes; the code is
    shifted left whenever the length grows (as in DEFLATE, RFC 1951 §3.2.2). Only
    the lengths need to be stored to rebuild the code.
    """
    if any((not isinstance(n, (int, np.integer))) or n < 0 for n in lengths):
        raise ValueError("lengths must be non-negative ints")
    order = sorted((int(n), s) for s, n in enumerate(lengths) if n > 0)
    if sum(2.0**-n for n, _ in order) > 1 + 1e-12:
        raise ValueError("lengths violate the Kraft inequality: no prefix code has them")
    codes: dict[int, str] = {}
    code, prev = 0, order[0][0] if order else 0
    for n, s in order:
        code <<= n - prev
        codes[s] = format(code, f"0{n}b")
        code, prev = code + 1, n
    return codes


def huffman_encode(symbols: np.ndarray | Sequence[int], lengths: Sequence[int]) -> bytes:
    """Concatenate the canonical codes of ``symbols``, zero-padded to whole bytes."""
    check_type("lengths", lengths, (list, tuple, np.ndarray))
    codes = canonical_codes(lengths)
    try:
        bits = "".join(codes[int(s)] for s in np.asarray(symbols).ravel())
    except KeyError as exc:
        raise ValueError(f"symbol {exc.args[0]} has no code (length 0 or out of range)") from None
    return _bits_to_bytes(bits)


def huffman_decode(data: bytes, lengths: Sequence[int], n: int) -> np.ndarray:
    """Decode ``n`` symbols from ``data`` (inverse of :func:`huffman_encode`).

    Walks the bits with the canonical decoder: it keeps the code read so far and, at
    each length, checks whether it falls in that length's range of codes.
    """
    check_type("data", data, (bytes, bytearray))
    check_type("lengths", lengths, (list, tuple, np.ndarray))
    check_int("n", n, minimum=0)
    decode: dict[tuple[int, int], int] = {
        (len(c), int(c, 2)): s for s, c in canonical_codes(lengths).items()
    }
    out = np.empty(n, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8)).tolist()
    max_len = max(lengths) if len(lengths) else 0
    pos, code, length, i = 0, 0, 0, 0
    while i < n:
        if pos >= len(bits):
            raise ValueError(f"Huffman stream ended after {i} of {n} symbols")
        code, length, pos = (code << 1) | bits[pos], length + 1, pos + 1
        sym = decode.get((length, code))
        if sym is not None:
            out[i], i, code, length = sym, i + 1, 0, 0
        elif length > max_len:
            raise ValueError("invalid Huffman code in the stream")
    return out


def _bits_to_bytes(bits: str) -> bytes:
    if not bits:
        return b""
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def pack_bits(values: np.ndarray | Sequence[int], width: int) -> bytes:
    """Pack non-negative ints into ``width`` bits each (big-endian bit order, zero padded)."""
    check_int("width", width, minimum=1, maximum=32)
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= 2**width):
        raise ValueError(f"values must lie in [0, {2**width - 1}] for width={width}")
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return np.packbits(((v[:, None] >> shifts) & 1).astype(np.uint8).ravel()).tobytes()


def unpack_bits(data: bytes, width: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``n`` values of ``width`` bits."""
    check_int("width", width, minimum=1, maximum=32)
    check_int("n", n, minimum=0)
    bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8))
    if bits.size < n * width:
        raise ValueError(f"need {n * width} bits for {n} values of width {width}, got {bits.size}")
    m = bits[: n * width].reshape(n, width).astype(np.int64)
    return m @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


# --------------------------------------------------------------------------------------
# Sparse storage with relative indices
# --------------------------------------------------------------------------------------


def relative_index_encode(flat: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse entries of a 1-D array as ``(gaps, values)`` with ``index_bits``-bit gaps.

    ``gap_i`` is the number of zeros skipped before non-zero ``i``. A gap larger than
    ``2**b − 1`` cannot be stored in ``b`` bits, so a filler zero is inserted after
    ``2**b − 1`` zeros (Han et al. 2016, Fig. 2); its value is 0 (symbol 0).
    """
    check_int("index_bits", index_bits, minimum=1, maximum=24)
    flat = np.asarray(flat)
    if flat.ndim != 1:
        raise ValueError(f"flat must be a 1-D array, got shape {flat.shape}")
    pos = np.flatnonzero(flat)
    gaps = np.diff(pos, prepend=-1) - 1
    m = 2**index_bits
    fillers = gaps // m
    slots = np.arange(pos.size) + np.cumsum(fillers)
    total = pos.size + int(fillers.sum())
    out_gaps = np.full(total, m - 1, dtype=np.int64)
    out_vals = np.zeros(total, dtype=flat.dtype)
    out_gaps[slots] = gaps - fillers * m
    out_vals[slots] = flat[pos]
    return out_gaps, out_vals


def relative_index_decode(gaps: np.ndarray, values: np.ndarray, numel: int) -> np.ndarray:
    """Inverse of :func:`relative_index_encode`: the dense 1-D array of length ``numel``.

    Entry ``i`` lands at ``p_i = Σ_{j≤i} (gap_j + 1) − 1``; gaps must be non-negative
    integers and the last position must lie below ``numel``.
    """
    check_int("numel", numel, minimum=0)
    gaps, values = np.asarray(gaps), np.asarray(values)
    if gaps.ndim != 1 or values.ndim != 1 or gaps.shape != values.shape:
        raise ValueError(
            "gaps and values must be 1-D arrays of the same length, "
            f"got shapes {gaps.shape} and {values.shape}"
        )
    if gaps.size and not np.issubdtype(gaps.dtype, np.integer):
        raise ValueError(f"gaps must be integers, got dtype {gaps.dtype}")
    gaps = gaps.astype(np.int64)
    if gaps.size and gaps.min() < 0:
        raise ValueError(f"gaps must be >= 0, got {int(gaps.min())}")
    pos = np.cumsum(gaps + 1) - 1
    if pos.size and pos[-1] >= numel:
        raise ValueError(f"positions run past numel={numel}")
    out = np.zeros(numel, dtype=values.dtype)
    out[pos] = values
    return out


# --------------------------------------------------------------------------------------
# The compressed file format
# --------------------------------------------------------------------------------------

MAGIC = b"DCMP"
FORMAT_VERSION = 1


class CompressedFormatError(ValueError):
    """A compressed model file is truncated, corrupted or not of this format."""


def _stream_bytes(
    symbols: np.ndarray, alphabet: int, huffman: bool, width: int
) -> tuple[dict, list[bytes]]:
    """One integer stream, fixed width or Huffman coded with its table of code lengths."""
    if not huffman:
        return {"w": width}, [pack_bits(symbols, width)]
    counts = (
        np.bincount(symbols, minlength=alphabet) if symbols.size else np.zeros(alphabet, np.int64)
    )
    lengths = huffman_code_lengths(counts) if symbols.size else [0] * alphabet
    used = len(lengths) - next((i for i, n in enumerate(reversed(lengths)) if n), len(lengths))
    table = bytes(lengths[:used])
    if max(lengths, default=0) > 255:
        raise CompressedFormatError("a Huffman code is longer than 255 bits")
    return {"h": 1}, [table, huffman_encode(symbols, lengths) if symbols.size else b""]


def _read_stream(meta: dict, parts: list[bytes], n: int) -> np.ndarray:
    if meta.get("h"):
        return huffman_decode(parts[1], list(parts[0]), n)
    return unpack_bits(parts[0], meta["w"], n)


KINDS = ("dense", "sparse", "shared")
DTYPES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)


def _corrupt(what: str) -> CompressedFormatError:
    return CompressedFormatError(f"corrupt compressed file: {what}")


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _corrupt(what)


def _is_int(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _check_stream_meta(m: Any, where: str, width_max: int) -> None:
    _need(isinstance(m, dict), f"{where}: stream description is not an object")
    if m.get("h"):
        _need(m == {"h": 1}, f"{where}: bad Huffman stream description {m}")
    else:
        _need(
            set(m) == {"w"} and _is_int(m["w"], 1) and m["w"] <= width_max,
            f"{where}: bad fixed-width stream description {m}",
        )


def _check_tensor_meta(t: Any, i: int) -> None:
    """Raise :class:`CompressedFormatError` unless ``t`` is a well-formed tensor entry."""
    _need(isinstance(t, dict), f"tensor entry {i} is not an object")
    _need(isinstance(t.get("n"), str), f"tensor entry {i} has no name")
    where = f"tensor {t['n']!r}"
    _need(
        t.get("k") in KINDS, f"{where}: unknown storage kind {t.get('k')!r}, known: {list(KINDS)}"
    )
    _need(t.get("d") in DTYPES, f"{where}: unknown dtype {t.get('d')!r}")
    _need(isinstance(t.get("s"), list) and all(_is_int(d) for d in t["s"]), f"{where}: bad shape")
    _need(
        isinstance(t.get("p"), list) and all(_is_int(n) for n in t["p"]), f"{where}: bad part sizes"
    )
    if t["k"] == "dense":
        _need(len(t["p"]) == 1, f"{where}: a dense tensor has 1 part, got {len(t['p'])}")
        return
    _need(t["d"] == "float32", f"{where}: {t['k']} storage needs float32, got {t['d']}")
    _need(
        _is_int(t.get("ne")) and _is_int(t.get("ib"), 1) and t["ib"] <= 24,
        f"{where}: bad entry count or index width",
    )
    _check_stream_meta(t.get("g"), where, 24)
    parts = 2 if t["g"].get("h") else 1
    if t["k"] == "shared":
        _need(_is_int(t.get("nc")) and t["nc"] <= 2**MAX_SHARED_BITS, f"{where}: bad codebook size")
        _check_stream_meta(t.get("v"), where, 16)
        parts += 1 + (2 if t["v"].get("h") else 1)
    else:
        parts += 1
    _need(
        len(t["p"]) == parts, f"{where}: {t['k']} tensor has {len(t['p'])} parts, expected {parts}"
    )


def _check_header(header: Any) -> None:
    """Validate the parsed JSON header; raise :class:`CompressedFormatError` on any defect."""
    _need(isinstance(header, dict), "the header is not an object")
    _need(header.get("v") == FORMAT_VERSION, f"header version {header.get('v')!r}")
    _need(isinstance(header.get("t"), list), "the header has no tensor list")
    _need(header.get("arch") is None or isinstance(header["arch"], dict), "bad arch entry")
    _need(
        isinstance(header["arch"].get("model"), str) if header.get("arch") else True,
        "arch has no model name",
    )
    lr = header.get("lr", {})
    _need(
        isinstance(lr, dict) and all(isinstance(k, str) and _is_int(v, 1) for k, v in lr.items()),
        "bad low-rank entry",
    )
    for i, t in enumerate(header["t"]):
        _check_tensor_meta(t, i)
    names = [t["n"] for t in header["t"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    _need(not twice, f"tensor name {twice[0]!r} occurs twice" if twice else "")


def _stream_cost(symbols: np.ndarray, alphabet: int, huffman: bool, width: int) -> int:
    """Bits of a stream (Huffman: code bits plus an 8-bit length per table entry)."""
    if not huffman:
        return symbols.size * width
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = np.asarray(huffman_code_lengths(counts)) if symbols.size else np.zeros(alphabet)
    return int((counts * lengths).sum()) + 8 * int(np.flatnonzero(lengths).max(initial=-1) + 1)


def _best_index_bits(flat: np.ndarray, value_bits: int, huffman: bool) -> int:
    """The relative-index width (1–12 bits) that gives the smallest stored tensor."""
    best, best_cost = 1, None
    for b in range(1, 13):
        gaps, vals = relative_index_encode(flat, b)
        cost = _stream_cost(gaps, 2**b, huffman, b)
        cost += (
            _stream_cost(vals.astype(np.int64), 2**value_bits, huffman, value_bits)
            if value_bits
            else 32 * vals.size
        )
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
    return best


def _encode_tensor(
    name: str, t: Tensor, huffman: bool, index_bits: int | None
) -> tuple[dict, list[bytes]]:
    """Choose the cheapest of dense / sparse float / shared codebook storage for one tensor."""
    t = t.detach().cpu().contiguous()
    meta: dict[str, Any] = {"n": name, "s": list(t.shape), "d": str(t.dtype).removeprefix("torch.")}
    if meta["d"] not in DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} cannot be stored; supported: {list(DTYPES)}")
    dense = (
        t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
    )
    if t.dtype != torch.float32 or t.dim() < 2:
        return {**meta, "k": "dense"}, [dense]
    shared = codebook_of(t) if torch.unique(t).numel() <= 2**MAX_SHARED_BITS + 1 else None
    flat_idx = shared.indices.flatten().numpy() if shared is not None else None
    if shared is not None:
        vbits = max(1, int(np.ceil(np.log2(shared.centroids.numel() + 1))))
        ib = index_bits or _best_index_bits(flat_idx, vbits, huffman)
        gaps, syms = relative_index_encode(flat_idx, ib)
        gmeta, gparts = _stream_bytes(gaps, 2**ib, huffman, ib)
        smeta, sparts = _stream_bytes(syms, 2**vbits, huffman, vbits)
        meta.update(
            k="shared", ib=ib, ne=int(gaps.size), g=gmeta, v=smeta, nc=shared.centroids.numel()
        )
        return meta, [shared.centroids.numpy().astype("<f4").tobytes(), *gparts, *sparts]
    flat = t.flatten().numpy()
    ib = index_bits or _best_index_bits(flat, 0, huffman)
    gaps, vals = relative_index_encode(flat, ib)
    if gaps.size * (32 + ib) >= 32 * flat.size:  # sparse would not be smaller
        return {**meta, "k": "dense"}, [dense]
    gmeta, gparts = _stream_bytes(gaps, 2**ib, huffman, ib)
    meta.update(k="sparse", ib=ib, ne=int(gaps.size), g=gmeta)
    return meta, [*gparts, vals.astype("<f4").tobytes()]


def _decode_tensor(meta: dict, parts: list[bytes]) -> Tensor:
    """One tensor from its (validated) header entry and byte parts."""
    shape, dtype = tuple(meta["s"]), getattr(torch, meta["d"])
    numel = int(np.prod(shape)) if shape else 1
    where = f"tensor {meta['n']!r}"
    if meta["k"] == "dense":
        np_dtype = (
            np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
        )
        _need(len(parts[0]) == numel * np.dtype(np_dtype).itemsize, f"{where}: wrong byte count")
        t = torch.from_numpy(np.frombuffer(parts[0], dtype=np_dtype).copy())
        return (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).reshape(shape)
    n, ng = meta["ne"], 2 if meta["g"].get("h") else 1
    if meta["k"] == "sparse":
        gaps = _read_stream(meta["g"], parts[:ng], n)
        _need(len(parts[ng]) == 4 * n, f"{where}: {len(parts[ng])} value bytes for {n} entries")
        vals = np.frombuffer(parts[ng], dtype="<f4")
        return torch.from_numpy(relative_index_decode(gaps, vals, numel).copy()).reshape(shape)
    _need(len(parts[0]) == 4 * meta["nc"], f"{where}: codebook bytes do not match its size")
    centroids = torch.from_numpy(np.frombuffer(parts[0], dtype="<f4").copy())
    gaps = _read_stream(meta["g"], parts[1 : 1 + ng], n)
    syms = _read_stream(meta["v"], parts[1 + ng :], n)
    if syms.size and syms.max() > meta["nc"]:
        raise _corrupt(
            f"{where}: codebook index {int(syms.max())} out of range (codebook of {meta['nc']})"
        )
    idx = torch.from_numpy(relative_index_decode(gaps, syms, numel)).reshape(shape)
    return SharedWeight(centroids, idx).decode()


def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    huffman: bool = True,
    index_bits: int | None = None,
    arch: Mapping[str, Any] | None = None,
) -> int:
    """Write ``model``'s state dict in the Deep Compression format; return the file's bytes.

    Every float32 weight (≥ 2-D) is stored in the cheapest of three forms:

    * ``shared`` — at most ``2**8`` distinct values (after :func:`apply_weight_sharing`):
      the codebook (float32), then the relative indices of the non-zeros and their
      codebook indices, each as a fixed-width stream or, with ``huffman``, a
      canonical Huffman code (table of code lengths + bitstream);
    * ``sparse`` — pruned float weights: relative indices + float32 values;
    * ``dense`` — raw bytes (also every bias, BN tensor and buffer).

    ``index_bits`` fixes the relative-index width (the paper uses 8 for conv, 5 for fc);
    ``None`` picks, per tensor, the width that gives the fewest bytes. ``arch`` (e.g.
    ``{"model": "lenet300"}`` plus ``utils.models.build_model`` arguments) is stored so
    that :func:`load_compressed` can rebuild the model without a template.

    Lossless in value: every tensor reloads equal to the saved one (``torch.equal``)
    with its dtype and shape. The one thing not kept is the sign of a zero in a
    ``sparse`` or ``shared`` tensor: zeros are not stored there, so a pruned ``−0.0``
    reloads as ``+0.0`` (equal as a number, different as a bit pattern); ``dense``
    tensors keep their exact bytes.

    Layout: ``b"DCMP"``, version (u8), header length (u32), zlib-compressed JSON header,
    the byte parts, and a CRC-32 of everything before it.
    """
    check_module("model", model)
    check_type("path", path, (str, Path))
    check_type("huffman", huffman, bool)
    if index_bits is not None:
        check_int("index_bits", index_bits, minimum=1, maximum=16)
    if arch is not None:
        check_type("arch", arch, Mapping)
    remove = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if remove:
        raise ValueError(
            f"model has parametrized layers {remove}; call remove_weight_sharing(model) first"
        )
    tensors, blobs = [], []
    for name, t in model.state_dict().items():
        meta, parts = _encode_tensor(name, t, huffman, index_bits)
        meta["p"] = [len(p) for p in parts]
        tensors.append(meta)
        blobs += parts
    header = {
        "v": FORMAT_VERSION,
        "arch": dict(arch) if arch else None,
        "lr": low_rank_ranks(model),
        "t": tensors,
    }
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = MAGIC + struct.pack("<BI", FORMAT_VERSION, len(head)) + head + b"".join(blobs)
    data = body + struct.pack("<I", zlib.crc32(body))
    Path(path).write_bytes(data)
    return len(data)


def read_compressed(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file of :func:`save_compressed`: ``(state_dict, header)``.

    Raises:
        CompressedFormatError: (a ``ValueError``) the file is not of this format, is
            truncated, has trailing bytes, its checksum does not match (a corrupted
            byte), or its checksum matches but its content is malformed (a header entry
            that is missing or of the wrong type, an unknown storage kind, an invalid
            Huffman code, a codebook index out of range …): the message starts with
            the path and says what is wrong.
    """
    check_type("path", path, (str, Path))
    data = Path(path).read_bytes()
    if len(data) < 13 or data[:4] != MAGIC:
        raise CompressedFormatError(
            f"{path}: not a compressed model file (bad magic bytes or too short)"
        )
    version, head_len = struct.unpack("<BI", data[4:9])
    if version != FORMAT_VERSION:
        raise CompressedFormatError(
            f"{path}: format version {version}, this reader knows {FORMAT_VERSION}"
        )
    try:
        header = json.loads(zlib.decompress(data[9 : 9 + head_len]))
    except (zlib.error, ValueError) as exc:
        raise CompressedFormatError(
            f"{path}: unreadable header (truncated or corrupted file): {exc}"
        ) from None
    try:
        _check_header(header)
    except CompressedFormatError as exc:
        raise CompressedFormatError(f"{path}: {exc}") from None
    need = 9 + head_len + sum(sum(t["p"]) for t in header["t"]) + 4
    if len(data) != need:
        raise CompressedFormatError(
            f"{path}: file is truncated or has trailing bytes: expected {need} bytes, got {len(data)}"
        )
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise CompressedFormatError(f"{path}: checksum mismatch, the file is corrupted")
    state, off = {}, 9 + head_len
    for meta in header["t"]:
        parts = []
        for n in meta["p"]:
            parts.append(data[off : off + n])
            off += n
        try:
            state[meta["n"]] = _decode_tensor(meta, parts)
        except CompressedFormatError as exc:
            raise CompressedFormatError(f"{path}: {exc}") from None
        except ValueError as exc:  # an invalid Huffman code, a stream too short …
            raise CompressedFormatError(
                f"{path}: corrupt compressed file: tensor {meta['n']!r}: {exc}"
            ) from None
    return state, header


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save_compressed` (every weight equal to the saved one), in eval mode.

    Equal in value (``torch.equal``), not always in bits: a ``−0.0`` of a sparse or
    shared weight comes back as ``+0.0`` (see :func:`save_compressed`).

    ``model`` is a template of the same architecture (copied, not modified); without it,
    the model is built from the ``arch`` stored in the file (``utils.models.build_model``
    arguments), with the low-rank layers the file records.
    """
    state, header = read_compressed(path)
    if model is not None:
        check_module("model", model)
        net = copy.deepcopy(model).cpu()
    else:
        if not header.get("arch"):
            raise ValueError(
                "the file stores no arch; pass a template model of the same architecture"
            )
        from utils.models import build_model

        arch = dict(header["arch"])
        net = build_model(arch.pop("model"), **arch)
    for name, rank in (header.get("lr") or {}).items():
        try:
            layer = net.get_submodule(name)
        except AttributeError:
            raise CompressedFormatError(
                f"{path}: low-rank layer {name!r} is not in the model"
            ) from None
        if not isinstance(layer, (LowRankLinear, nn.Linear)):
            raise CompressedFormatError(f"{path}: low-rank layer {name!r} is not a Linear layer")
        if not isinstance(layer, LowRankLinear):
            _set_module(net, name, LowRankLinear.from_linear(net.get_submodule(name), rank))
    net.load_state_dict(state)
    return net.eval()


def file_breakdown(path: str | Path) -> dict[str, int]:
    """Bytes of the file by role: ``header``, ``codebook``, ``index`` (positions), ``weights``, ``dense``.

    ``header`` also counts the magic, version, lengths and checksum; ``index`` the
    relative-index streams (with their Huffman tables); ``weights`` the codebook-index
    streams of shared tensors and the float32 values of sparse ones; ``dense`` the raw
    tensors. The roles add up to the file size.
    """
    _, header = read_compressed(path)
    parts = sum(sum(meta["p"]) for meta in header["t"])
    out = {
        "header": Path(path).stat().st_size - parts,
        "codebook": 0,
        "index": 0,
        "weights": 0,
        "dense": 0,
    }
    for meta in header["t"]:
        p = meta["p"]
        if meta["k"] == "dense":
            out["dense"] += p[0]
            continue
        ng = 2 if meta["g"].get("h") else 1
        if meta["k"] == "sparse":
            out["index"] += sum(p[:ng])
            out["weights"] += sum(p[ng:])
        else:
            out["codebook"] += p[0]
            out["index"] += sum(p[1 : 1 + ng])
            out["weights"] += sum(p[1 + ng :])
    return out


# --------------------------------------------------------------------------------------
# Low-rank factorisation
# --------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """``y = U (V x) + b`` with ``V ∈ R^{r×in}``, ``U ∈ R^{out×r}``: a rank-``r`` linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        check_int("rank", rank, minimum=1)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int) -> LowRankLinear:
        """Truncated SVD ``W ≈ U_r Σ_r V_rᵀ`` split as ``(U_r Σ_r^½)(Σ_r^½ V_rᵀ)``.

        By Eckart–Young the Frobenius error is ``sqrt(Σ_{i>r} σ_i²)``, the smallest of
        any rank-``r`` matrix (Denton et al. 2014 apply this to linear layers).
        """
        check_type("layer", layer, nn.Linear)
        check_int("rank", rank, minimum=1, maximum=min(layer.in_features, layer.out_features))
        out = cls(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
        w = layer.weight.detach().cpu().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            out.first.weight.copy_((root[:, None] * vh[:rank]).float())
            out.second.weight.copy_((u[:, :rank] * root).float())
            if layer.bias is not None:
                out.second.bias.copy_(layer.bias.detach().cpu())
        return out.to(layer.weight.device)


def rank_for_energy(weight: Tensor, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ energy · Σ_i σ_i²`` (the kept fraction of ‖W‖_F²).

    The result lies in ``[1, min(m, n)]`` for an ``m × n`` weight. A zero matrix has no
    energy to keep: every rank keeps all of it, so the answer is the smallest, 1.
    """
    check_tensor("weight", weight, finite=True, ndim=2)
    check_float("energy", energy, 0.0, 1.0, min_inclusive=False)
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    s = torch.linalg.svdvals(weight.detach().double())
    total = (s**2).sum()
    if total == 0:
        return 1
    cum = torch.cumsum(s**2, 0) / total
    target = torch.tensor(energy, dtype=cum.dtype, device=cum.device) - 1e-12
    return min(int(torch.searchsorted(cum, target)) + 1, s.numel())


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def low_rank_ranks(model: nn.Module) -> dict[str, int]:
    """``{layer name: rank}`` of the :class:`LowRankLinear` layers of ``model``."""
    check_module("model", model)
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def factorize_linears(
    model: nn.Module,
    *,
    energy: float | None = None,
    ranks: Mapping[str, int] | None = None,
    min_saving: float = 1.0,
) -> nn.Module:
    """Replace Linear layers of ``model`` (in place) by :class:`LowRankLinear`.

    With ``ranks`` the listed layers get those ranks; with ``energy`` every Linear gets
    :func:`rank_for_energy` and is factorised only when the parameters shrink by more
    than ``min_saving``: ``r (in + out) · min_saving < in · out``.
    """
    check_module("model", model)
    if (energy is None) == (ranks is None):
        raise ValueError("give exactly one of energy or ranks")
    check_float("min_saving", min_saving, 1.0)
    targets = dict(ranks) if ranks is not None else {}
    if energy is not None:
        check_float("energy", energy, 0.0, 1.0, min_inclusive=False)
        for n, m in model.named_modules():
            if isinstance(m, nn.Linear) and not n.endswith(("first", "second")):
                r = rank_for_energy(m.weight, energy)
                if (
                    r * (m.in_features + m.out_features) * min_saving
                    < m.in_features * m.out_features
                ):
                    targets[n] = r
    for name, r in targets.items():
        layer = model.get_submodule(name)
        check_type(f"layer {name!r}", layer, nn.Linear)
        _set_module(model, name, LowRankLinear.from_linear(layer, r))
    return model


def rank_for_accuracy(
    model: nn.Module,
    layer: str,
    evaluate_fn: Callable[[nn.Module], float],
    max_drop: float,
    candidates: Sequence[int] | None = None,
) -> int:
    """Smallest rank of Linear ``layer`` whose factorised model loses at most ``max_drop`` accuracy points.

    ``evaluate_fn(model) -> accuracy (%)`` is called on copies (e.g. on the validation
    split); ``candidates`` defaults to powers of two below the full rank.
    """
    check_module("model", model)
    check_float("max_drop", max_drop, 0.0)
    lin = model.get_submodule(layer)
    check_type(f"layer {layer!r}", lin, nn.Linear)
    full = min(lin.in_features, lin.out_features)
    cands = (
        sorted(candidates)
        if candidates is not None
        else [2**i for i in range(full.bit_length()) if 2**i < full]
    )
    reference = evaluate_fn(model)
    for r in cands:
        trial = factorize_linears(copy.deepcopy(model), ranks={layer: r})
        if reference - evaluate_fn(trial) <= max_drop:
            return r
    return full


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------


def compressed_bytes(
    model: nn.Module, *, huffman: bool = True, index_bits: int | None = None
) -> int:
    """Bytes of :func:`save_compressed`'s file for ``model`` (written to memory, not estimated)."""
    check_module("model", model)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return save_compressed(model, Path(tmp) / "m.dcmp", huffman=huffman, index_bits=index_bits)


# --------------------------------------------------------------------------------------
# Pipelines: prune → fine-tune → quantize → fine-tune → encode, and prune → quantize → distill
# --------------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _check_sparsity(sparsity: float | Mapping[str, float]) -> None:
    if isinstance(sparsity, Mapping):
        for name, s in sparsity.items():
            check_float(f"sparsity[{name!r}]", s, 0.0, 1.0, max_inclusive=False)
    else:
        check_float("sparsity", sparsity, 0.0, 1.0, max_inclusive=False)


def prune_finetune(
    model: nn.Module,
    train_loader: DataLoader,
    sparsity: float | Mapping[str, float],
    *,
    steps: int = 3,
    epochs: int = 1,
    lr: float = 1e-3,
    compute_loss: LossFn | None = None,
    progress: bool = False,
) -> nn.Module:
    """Iterative magnitude pruning (Han et al. 2015), in place: ``steps`` rounds of prune + fine-tune.

    Round ``t`` prunes every layer to ``s · t / steps`` (``sparsity`` is one fraction for
    all Conv2d/Linear layers or ``{layer: fraction}``) with
    :func:`utils.pruning.magnitude_prune`, then trains ``epochs`` with
    :func:`utils.training.fit` on the model's device while the masks keep pruned
    weights at zero. The masks are then made permanent (plain weights with exact zeros).
    """
    check_module("model", model)
    check_type("train_loader", train_loader, DataLoader)
    _check_sparsity(sparsity)
    check_int("steps", steps, minimum=1)
    check_int("epochs", epochs, minimum=0)
    check_float("lr", lr, 0.0, min_inclusive=False)
    device = device_of(model)
    targets = (
        dict(sparsity)
        if isinstance(sparsity, Mapping)
        else dict.fromkeys(sharable_layers(model), sparsity)
    )
    for t in range(1, steps + 1):
        with torch.no_grad():
            for name, s in targets.items():
                magnitude_prune(model, s * t / steps, layers=[name])
        fit(
            model,
            train_loader,
            epochs=epochs,
            lr=lr,
            compute_loss=compute_loss,
            device=device,
            progress=progress,
            desc=f"prune {t}",
        )
    return make_permanent(model).eval()


def quantize_finetune(
    model: nn.Module,
    train_loader: DataLoader,
    bits: int | Mapping[str, int],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    compute_loss: LossFn | None = None,
    progress: bool = False,
) -> nn.Module:
    """Trained quantization, in place: k-means weight sharing, then fine-tuning of the centroids.

    :func:`apply_weight_sharing` makes the centroids the trainable tensors, so
    :func:`utils.training.fit` updates each centroid by the summed gradient of its
    cluster (Han et al. 2016, eq. 3; biases train too); the shared weights are then
    materialised with :func:`remove_weight_sharing`. Trains on the model's device.
    """
    check_module("model", model)
    check_type("train_loader", train_loader, DataLoader)
    check_int("epochs", epochs, minimum=0)
    check_float("lr", lr, 0.0, min_inclusive=False)
    device = device_of(model)
    apply_weight_sharing(model, bits)
    fit(
        model,
        train_loader,
        epochs=epochs,
        lr=lr,
        compute_loss=compute_loss,
        device=device,
        progress=progress,
        desc="centroids",
    )
    return remove_weight_sharing(model).eval()


@dataclass
class PipelineConfig:
    """Settings of a compression pipeline (JSON-serialisable, so it can key a cache).

    Attributes:
        sparsity: fraction of weights pruned, one for all layers or ``{layer: fraction}``.
        bits: shared values per layer as bits (``{layer | "conv" | "fc": bits}`` allowed).
        prune_steps, prune_epochs: iterative pruning rounds and fine-tuning epochs per round.
        quant_epochs: epochs of centroid fine-tuning.
        lr: Adam learning rate of all fine-tuning.
        low_rank_energy: factorise the Linear layers first, keeping this fraction of ``‖W‖_F²``.
        distill: fine-tune with the dense model as teacher (``temperature``, ``alpha``).
    """

    sparsity: float | dict[str, float] = 0.9
    bits: int | dict[str, int] = 5
    prune_steps: int = 3
    prune_epochs: int = 1
    quant_epochs: int = 1
    lr: float = 1e-3
    low_rank_energy: float | None = None
    distill: bool = False
    temperature: float = 4.0
    alpha: float = 0.9

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _per_factor(model: nn.Module, per_layer: Any) -> Any:
    """Give both factors of a :class:`LowRankLinear` the setting of the layer they replaced."""
    if not isinstance(per_layer, Mapping):
        return per_layer
    modules = dict(model.named_modules())
    out = {}
    for name, value in per_layer.items():
        if isinstance(modules.get(name), LowRankLinear):
            out[f"{name}.first"] = out[f"{name}.second"] = value
        else:
            out[name] = value
    return out


def deep_compression(
    model: nn.Module,
    train_loader: DataLoader,
    config: PipelineConfig,
    *,
    teacher: nn.Module | None = None,
    progress: bool = False,
) -> dict[str, nn.Module]:
    """Prune → fine-tune → quantize → fine-tune (Han et al. 2016) on a copy of ``model``.

    Returns the model after each stage, ``{"dense", "low_rank"?, "pruned", "quantized"}``
    (copies, eval mode); the last stage, encoding, is :func:`save_compressed`, whose
    Huffman coding is lossless. With ``config.low_rank_energy`` the Linear layers are
    first factorised by truncated SVD and fine-tuned. With ``config.distill`` every
    fine-tuning uses chapter 4's :func:`utils.distillation.make_kd_loss` (Hinton et al.
    2015) with ``teacher`` (default: the dense model), which makes this the
    prune → quantize → distill recipe. Everything runs on ``model``'s device (a
    teacher elsewhere is copied there); the stages are returned on that device.
    """
    check_module("model", model)
    check_type("train_loader", train_loader, DataLoader)
    check_type("config", config, PipelineConfig)
    if teacher is not None:
        check_module("teacher", teacher)
    device = device_of(model)
    stages = {"dense": copy.deepcopy(model).eval()}
    work = copy.deepcopy(model)
    if teacher is not None and device_of(teacher) != device:
        teacher = copy.deepcopy(teacher).to(device)
    loss = (
        make_kd_loss(
            teacher if teacher is not None else stages["dense"], config.temperature, config.alpha
        )
        if config.distill
        else None
    )
    if config.low_rank_energy is not None:
        factorize_linears(work, energy=config.low_rank_energy)
        fit(
            work,
            train_loader,
            epochs=config.prune_epochs,
            lr=config.lr,
            compute_loss=loss,
            device=device,
            progress=progress,
            desc="low rank",
        )
        stages["low_rank"] = copy.deepcopy(work).eval()
    sparsity, bits = _per_factor(work, config.sparsity), _per_factor(work, config.bits)
    prune_finetune(
        work,
        train_loader,
        sparsity,
        steps=config.prune_steps,
        epochs=config.prune_epochs,
        lr=config.lr,
        compute_loss=loss,
        progress=progress,
    )
    stages["pruned"] = copy.deepcopy(work).eval()
    quantize_finetune(
        work,
        train_loader,
        bits,
        epochs=config.quant_epochs,
        lr=config.lr,
        compute_loss=loss,
        progress=progress,
    )
    stages["quantized"] = work.eval()
    return stages


def prune_quantize_distill(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: DataLoader,
    config: PipelineConfig,
    *,
    progress: bool = False,
) -> dict[str, nn.Module]:
    """The three-step recipe prune → quantize → distill: :func:`deep_compression` with a teacher.

    Every fine-tuning step learns from ``teacher``'s soft targets
    (``utils.distillation.make_kd_loss``) instead of the labels alone.
    """
    check_module("teacher", teacher)
    check_type("config", config, PipelineConfig)
    from dataclasses import replace

    return deep_compression(
        student, train_loader, replace(config, distill=True), teacher=teacher, progress=progress
    )


def stage_files(
    stages: Mapping[str, nn.Module], folder: str | Path, *, arch: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write each stage with :func:`save_compressed`; the quantized stage twice (fixed width, Huffman).

    Returns ``{stage: path}`` with stages ``dense``, ``low_rank``, ``pruned``, ``quantized``
    (fixed-width codes) and ``huffman`` (the final Deep Compression file).
    """
    check_type("folder", folder, (str, Path))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, model in stages.items():
        out[name] = folder / f"{name}.dcmp"
        save_compressed(model, out[name], huffman=False, arch=arch)
    if "quantized" in stages:
        out["huffman"] = folder / "huffman.dcmp"
        save_compressed(stages["quantized"], out["huffman"], huffman=True, arch=arch)
    return out


def baseline_arch(model: str, dataset: str = "mnist5k") -> dict[str, Any]:
    """``build_model`` arguments of a course baseline, to store in a compressed file (``arch``)."""
    s = load_splits(dataset)
    return {
        "model": model,
        "in_channels": s.input_shape[0],
        "num_classes": s.num_classes,
        "input_size": s.input_shape[-1],
    }


def compress_baseline(
    model: str,
    dataset: str,
    config: PipelineConfig,
    *,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, nn.Module]:
    """:func:`deep_compression` of the cached course baseline, itself cached by configuration.

    The dense model is ``utils.cache.load_baseline(model, dataset, seed=seed)``; the
    stages are trained once per (baseline, pipeline, batch size) and stored with
    ``utils.cache.cached_state`` as one ``nn.ModuleDict``, so a lesson re-run only loads
    them. With ``config.distill`` the dense baseline is the teacher. Training runs on
    ``utils.config.get_device()`` (CUDA when present); the stages are returned on the CPU.
    """
    from utils.config import get_device

    check_type("config", config, PipelineConfig)
    check_int("batch_size", batch_size, minimum=1)
    dense = load_baseline(model, dataset, seed=seed)
    splits = load_splits(dataset, seed=seed)
    key = {
        "baseline": baseline_config(model, dataset, seed=seed),
        "pipeline": config.as_dict(),
        "batch_size": batch_size,
    }

    def build() -> nn.Module:
        structure = copy.deepcopy(dense)
        stages = {"dense": copy.deepcopy(dense)}
        if config.low_rank_energy is not None:
            factorize_linears(structure, energy=config.low_rank_energy)
            stages["low_rank"] = copy.deepcopy(structure)
        stages["pruned"], stages["quantized"] = copy.deepcopy(structure), structure
        return nn.ModuleDict(stages)

    def train(holder: nn.Module) -> None:
        seed_everything(seed)
        loader = make_loader(splits.train, batch_size, shuffle=True, seed=seed)
        work = copy.deepcopy(dense).to(get_device())
        for name, stage in deep_compression(work, loader, config, progress=progress).items():
            holder[name].load_state_dict(stage.state_dict())

    holder, _, _ = cached_state(f"dc-{model}-{dataset}", key, build, train)
    return {name: stage.cpu().eval() for name, stage in holder.items()}
