"""Tests of utils.compression: weight sharing, Huffman coding, the file format, low rank, pipelines."""

from __future__ import annotations

import copy
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from utils import compression as C
from utils.data import load_splits, make_loader
from utils.models import build_model

# ----------------------------------------------------------------------- weight sharing


def test_share_weight_hand_example_keeps_zeros():
    w = torch.tensor([[0.0, 1.0, 1.1, 5.0], [5.2, 0.0, 0.9, 5.1]])
    shared = C.share_weight(w, bits=1)
    assert torch.allclose(shared.centroids, torch.tensor([1.0, 5.1]))
    assert torch.equal(shared.indices, torch.tensor([[0, 1, 1, 2], [2, 0, 1, 2]]))
    expected = torch.tensor([[0.0, 1.0, 1.0, 5.1], [5.1, 0.0, 1.0, 5.1]])
    assert torch.allclose(shared.decode(), expected)


def test_share_weight_matches_sklearn_kmeans_with_linear_init():
    from sklearn.cluster import KMeans

    torch.manual_seed(0)
    w = torch.randn(40, 30)
    w[w.abs() < 0.5] = 0.0
    shared = C.share_weight(w, bits=3, iters=100)
    values = w[w != 0].double().numpy().reshape(-1, 1)
    init = np.linspace(values.min(), values.max(), 8).reshape(-1, 1)
    km = KMeans(8, init=init, n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(values)
    ref = np.sort(km.cluster_centers_.ravel())
    assert np.allclose(shared.centroids.numpy(), ref, atol=1e-5)
    assert int(shared.indices.max()) <= 8
    assert torch.equal(shared.indices == 0, w == 0)


def test_share_weight_all_zero_and_bad_arguments():
    shared = C.share_weight(torch.zeros(3, 3), 4)
    assert shared.centroids.numel() == 0 and torch.equal(shared.decode(), torch.zeros(3, 3))
    with pytest.raises(TypeError, match="weight"):
        C.share_weight([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="bits"):
        C.share_weight(torch.ones(2, 2), 0)
    with pytest.raises(ValueError, match="bits"):
        C.share_weight(torch.ones(2, 2), 9)


def test_centroid_gradient_is_sum_of_cluster_gradients_and_zeros_stay_zero():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.15] = 0.0
    dense = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    shared = C.share_weight(layer.weight, 2)
    C.apply_weight_sharing(layer, bits=2)
    rule = layer.parametrizations.weight[0]
    assert torch.allclose(layer.weight, shared.decode())  # the centroids are the cluster means
    with torch.no_grad():  # the same (shared) weights in a plain layer
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    layer(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    k = rule.num_centroids
    expected = torch.zeros(k + 1).index_add_(
        0, rule.indices.flatten(), dense.weight.grad.flatten()
    )[1:]
    assert torch.allclose(layer.parametrizations.weight.original.grad, expected, atol=1e-6)
    zeros = rule.indices == 0
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    assert torch.all(layer.weight[zeros] == 0)
    C.remove_weight_sharing(layer)
    assert isinstance(layer.weight, nn.Parameter) and not hasattr(layer, "parametrizations")
    assert torch.unique(layer.weight[~zeros]).numel() <= 4


def test_apply_weight_sharing_per_layer_bits_and_errors():
    model = build_model("lenet300", input_size=8)
    C.apply_weight_sharing(model, {"fc1": 2, "fc": 3})
    C.remove_weight_sharing(model)
    assert torch.unique(model.fc1.weight).numel() <= 4
    assert torch.unique(model.fc3.weight).numel() <= 8
    with pytest.raises(ValueError, match="no entry"):
        C.apply_weight_sharing(build_model("lenet300", input_size=8), {"fc1": 2})
    with pytest.raises(TypeError, match="model"):
        C.apply_weight_sharing("model", 4)


def test_codebook_of_recovers_weights_exactly():
    w = torch.tensor([[-0.5, 0.0, 0.25], [0.25, -0.5, 0.0], [1.5, 0.0, -0.5]])
    shared = C.codebook_of(w)
    assert torch.equal(shared.centroids, torch.tensor([-0.5, 0.25, 1.5]))
    assert torch.equal(shared.indices, torch.tensor([[1, 0, 2], [2, 1, 0], [3, 0, 1]]))
    assert torch.equal(shared.decode(), w)


# ----------------------------------------------------------------------- Huffman coding


def test_huffman_hand_example_and_canonical_codes():
    assert C.huffman_code_lengths([5, 2, 1, 1]) == [1, 2, 3, 3]
    assert C.canonical_codes([1, 2, 3, 3]) == {0: "0", 1: "10", 2: "110", 3: "111"}
    # CLRS 16.3: a..f with counts 45, 13, 12, 16, 9, 5 cost 224 bits per 100 characters
    counts = [45, 13, 12, 16, 9, 5]
    lengths = C.huffman_code_lengths(counts)
    assert lengths == [1, 3, 3, 3, 4, 4]
    assert sum(c * n for c, n in zip(counts, lengths, strict=True)) == 224


def test_huffman_edge_cases_and_errors():
    assert C.huffman_code_lengths([0, 7, 0]) == [0, 1, 0]
    assert C.huffman_code_lengths([0, 3, 1]) == [0, 1, 1]
    with pytest.raises(ValueError, match="counts"):
        C.huffman_code_lengths([1.5, 2.0])
    with pytest.raises(ValueError, match="counts"):
        C.huffman_code_lengths([-1, 2])
    with pytest.raises(ValueError, match="Kraft"):
        C.canonical_codes([1, 1, 1])
    with pytest.raises(ValueError, match="no code"):
        C.huffman_encode([2], [1, 1, 0])
    with pytest.raises(ValueError, match="ended"):
        C.huffman_decode(b"", [1, 1], 3)


def test_huffman_length_is_within_one_bit_of_entropy():
    from scipy.stats import entropy

    rng = np.random.default_rng(0)
    symbols = rng.geometric(0.3, size=5000) - 1
    counts = np.bincount(symbols)
    lengths = np.array(C.huffman_code_lengths(counts))
    mean = (counts * lengths).sum() / counts.sum()
    h = entropy(counts / counts.sum(), base=2)
    assert h <= mean < h + 1
    assert math.isclose(sum(2.0 ** -int(n) for n in lengths if n), 1.0)  # a complete prefix code
    data = C.huffman_encode(symbols, lengths)
    assert len(data) == math.ceil((counts * lengths).sum() / 8)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=300))
def test_huffman_decode_inverts_encode(symbols):
    counts = np.bincount(symbols, minlength=41)
    lengths = C.huffman_code_lengths(counts)
    data = C.huffman_encode(symbols, lengths)
    assert C.huffman_decode(data, lengths, len(symbols)).tolist() == symbols


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(0, 4095), max_size=200))
def test_pack_bits_round_trip(width, values):
    values = [v % 2**width for v in values]
    data = C.pack_bits(values, width)
    assert len(data) == math.ceil(len(values) * width / 8)
    assert C.unpack_bits(data, width, len(values)).tolist() == values


def test_pack_bits_rejects_out_of_range():
    with pytest.raises(ValueError, match="values must lie"):
        C.pack_bits([4], 2)
    with pytest.raises(ValueError, match="width"):
        C.pack_bits([1], 0)


# ------------------------------------------------------------------- relative indices


def test_relative_index_hand_example_with_filler():
    flat = np.array([0, 0, 5, 0, 0, 0, 0, 0, 7, 0])
    gaps, values = C.relative_index_encode(flat, index_bits=2)
    # gap 5 > 3 = 2**2 - 1: a filler zero after 3 zeros, then a gap of 1
    assert gaps.tolist() == [2, 3, 1] and values.tolist() == [5, 0, 7]
    assert C.relative_index_decode(gaps, values, 10).tolist() == flat.tolist()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=0, max_size=300).map(
        lambda v: [x if x < 3 else 0 for x in v]
    ),
    st.integers(1, 6),
)
def test_relative_index_round_trip(values, bits):
    flat = np.array(values, dtype=np.int64)
    gaps, vals = C.relative_index_encode(flat, bits)
    assert gaps.max(initial=0) < 2**bits
    assert C.relative_index_decode(gaps, vals, flat.size).tolist() == values


def test_relative_index_decode_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        C.relative_index_decode(np.array([0, 1]), np.array([1]), 5)
    with pytest.raises(ValueError, match="past numel"):
        C.relative_index_decode(np.array([4]), np.array([1]), 3)
    with pytest.raises(ValueError, match="past numel"):
        C.relative_index_decode(np.array([0, 2]), np.array([1, 2]), 3)  # position 3 of 0..2
    assert C.relative_index_decode(np.array([0, 1]), np.array([1, 2]), 3).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="gaps must be >= 0"):
        C.relative_index_decode(np.array([2, -2]), np.array([1, 2]), 5)  # would write out[1] twice
    with pytest.raises(ValueError, match="gaps must be integers"):
        C.relative_index_decode(np.array([0.5]), np.array([1]), 5)
    with pytest.raises(ValueError, match="1-D"):
        C.relative_index_decode(np.zeros((1, 2), dtype=int), np.zeros((1, 2)), 5)
    with pytest.raises(ValueError, match="flat must be a 1-D"):
        C.relative_index_encode(np.zeros((2, 2)), 2)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-3, 3, allow_nan=False, width=32), max_size=200).map(
        lambda v: [x if abs(x) > 1.5 else 0.0 for x in v]
    ),
    st.integers(1, 5),
)
def test_relative_index_round_trip_of_float_values_and_filler_count(values, bits):
    flat = np.array(values, dtype=np.float32)
    gaps, vals = C.relative_index_encode(flat, bits)
    assert gaps.max(initial=0) <= 2**bits - 1  # the largest gap b bits can hold
    pos = np.flatnonzero(flat)
    raw = np.diff(pos, prepend=-1) - 1
    assert gaps.size == pos.size + int((raw // 2**bits).sum())  # one filler per 2**b zeros
    assert np.array_equal(C.relative_index_decode(gaps, vals, flat.size), flat)


# ------------------------------------------------------------------------ file format


def _compressed_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("lenet300", input_size=8)
    with torch.no_grad():
        for m in (model.fc1, model.fc2, model.fc3):
            m.weight[m.weight.abs() < 0.1] = 0.0
    C.apply_weight_sharing(model, {"fc1": 3, "fc2": 4, "fc3": 5})
    return C.remove_weight_sharing(model)


@pytest.mark.parametrize("huffman", [True, False])
def test_save_load_round_trip_is_bit_identical(tmp_path, huffman):
    model = _compressed_tiny()
    path = tmp_path / "m.dcmp"
    size = C.save_compressed(
        model, path, huffman=huffman, arch={"model": "lenet300", "input_size": 8}
    )
    assert size == path.stat().st_size
    loaded = C.load_compressed(path)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k, a in want.items():
        assert a.dtype == got[k].dtype and torch.equal(a, got[k]), k
    breakdown = C.file_breakdown(path)
    assert sum(breakdown.values()) == size
    # three shared weights with 8, 16 and 32 shared values: float32 codebooks
    assert breakdown["codebook"] == 4 * sum(
        int(torch.unique(m.weight[m.weight != 0]).numel())
        for m in (model.fc1, model.fc2, model.fc3)
    )
    assert breakdown["dense"] == 4 * (300 + 100 + 10)  # the float32 biases


def _hand_model() -> nn.Module:
    """A 2×8 layer with two shared values; by hand its file parts are known to the byte."""
    layer = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0, 0, 1.5, 0, 0, 0, -2, 0], [0, 1.5, 0, 0, 0, 0, 0, -2]]))
    return nn.Sequential(layer)


def test_hand_checked_file_parts_and_breakdown(tmp_path):
    path = _save(tmp_path, _hand_model(), huffman=False, index_bits=2)
    _, header = C.read_compressed(path)
    (meta,) = header["t"]
    # codebook [-2, 1.5]: indices 0 0 2 0 0 0 1 0 | 0 2 0 0 0 0 0 1; non-zeros at 2, 6, 9, 15:
    # gaps 2, 3, 2, 5 -> 5 > 3 = 2**2 - 1, so a filler: gaps 2 3 2 3 1, symbols 2 1 2 0 1
    assert (meta["k"], meta["nc"], meta["ib"], meta["ne"]) == ("shared", 2, 2, 5)
    assert meta["g"] == {"w": 2} and meta["v"] == {"w": 2}  # 2 bits code 3 symbols
    assert meta["p"] == [8, 2, 2]  # 2 floats, 5 gaps * 2 bits, 5 symbols * 2 bits
    data = path.read_bytes()
    start = len(data) - 4 - 12
    assert data[start : start + 8] == np.array([-2.0, 1.5], "<f4").tobytes()
    assert data[start + 8 : start + 10] == bytes([0b10111011, 0b01000000])  # 10 11 10 11 01
    assert data[start + 10 : start + 12] == bytes([0b10011000, 0b01000000])  # 10 01 10 00 01
    breakdown = C.file_breakdown(path)
    assert breakdown == {
        "header": len(data) - 12,
        "codebook": 8,
        "index": 2,
        "weights": 2,
        "dense": 0,
    }


def test_sparse_float_storage_and_its_breakdown(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4096, generator=g)
    w[:, torch.randperm(4096, generator=g)[400:]] = 0.0  # 400 distinct non-zeros: not shareable
    model = nn.Sequential(nn.Linear(4096, 1, bias=False))
    model[0].weight.data = w
    path = _save(tmp_path, model, huffman=False, index_bits=8)
    (meta,) = C.read_compressed(path)[1]["t"]
    gaps, _ = C.relative_index_encode(w.flatten().numpy(), 8)
    assert (meta["k"], meta["ne"], meta["p"]) == ("sparse", gaps.size, [gaps.size, 4 * gaps.size])
    breakdown = C.file_breakdown(path)
    assert (breakdown["index"], breakdown["weights"], breakdown["codebook"]) == (
        gaps.size,
        4 * gaps.size,
        0,
    )
    assert torch.equal(C.load_compressed(path, model)[0].weight, w)

    def short_values(header, parts):
        parts[0][1] = parts[0][1][:-4]

    with pytest.raises(C.CompressedFormatError, match="value bytes for"):
        C.read_compressed(_rewrite(path, tmp_path, parts_fn=short_values))
    dense = nn.Sequential(nn.Linear(300, 1))  # 300 distinct values, no zeros: stored raw
    kinds = {t["n"]: t["k"] for t in C.read_compressed(_save(tmp_path, dense))[1]["t"]}
    assert kinds == {"0.weight": "dense", "0.bias": "dense"}


def test_negative_zero_reloads_equal_in_value_as_positive_zero(tmp_path):
    model = _hand_model()
    with torch.no_grad():
        model[0].weight.mul_(-1.0)  # the zeros become -0.0, as in a pruned negative weight
    model.add_module("1", nn.Linear(2, 2))
    model[1].bias.data = torch.tensor([-0.0, 1.0])
    assert bool(torch.signbit(model[0].weight[0, 0]))
    loaded = C.load_compressed(_save(tmp_path, model), model)
    assert torch.equal(loaded[0].weight, model[0].weight)  # equal as values …
    zeros = loaded[0].weight == 0
    assert not torch.signbit(loaded[0].weight[zeros]).any()  # … the zeros come back as +0.0
    assert bool(torch.signbit(loaded[1].bias[0]))  # dense tensors keep their exact bits


def test_file_sizes_shrink_stage_by_stage(tmp_path):
    torch.manual_seed(0)
    dense = build_model("lenet300", input_size=8)
    pruned = _compressed_tiny()
    with torch.no_grad():  # same zeros as the quantized model, float values
        for a, b in ((pruned.fc1, dense.fc1), (pruned.fc2, dense.fc2), (pruned.fc3, dense.fc3)):
            b.weight.mul_(a.weight != 0)
    n_dense = C.compressed_bytes(build_model("lenet300", input_size=8), huffman=False)
    n_sparse = C.compressed_bytes(dense, huffman=False)
    n_fixed = C.compressed_bytes(pruned, huffman=False)
    n_huff = C.compressed_bytes(pruned, huffman=True)
    assert n_dense > n_sparse > n_fixed > n_huff
    params = sum(p.numel() for p in dense.parameters())
    assert n_dense < 4 * params + 1024  # raw float32 plus a small header
    assert C.load_compressed(_save(tmp_path, dense), dense).fc1.weight.eq(dense.fc1.weight).all()


def _save(tmp_path, model, **kw):
    path = tmp_path / "x.dcmp"
    C.save_compressed(model, path, **kw)
    return path


def test_fixed_index_bits_and_dense_fallback(tmp_path):
    model = _compressed_tiny()
    path = _save(tmp_path, model, index_bits=5)
    assert torch.equal(C.load_compressed(path, model).fc1.weight, model.fc1.weight)
    _, header = C.read_compressed(path)
    kinds = {t["n"]: t["k"] for t in header["t"]}
    assert kinds["fc1.weight"] == "shared" and kinds["fc1.bias"] == "dense"
    assert {t["ib"] for t in header["t"] if t["k"] == "shared"} == {5}


def test_corrupted_truncated_and_foreign_files_fail_clearly(tmp_path):
    path = _save(tmp_path, _compressed_tiny())
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.dcmp"
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(C.CompressedFormatError, match="checksum"):
        C.load_compressed(bad, build_model("lenet300", input_size=8))
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(C.CompressedFormatError, match="truncated"):
        C.read_compressed(bad)
    bad.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])
    with pytest.raises(C.CompressedFormatError, match="not a compressed"):
        C.read_compressed(bad)
    with pytest.raises(ValueError, match="arch"):
        C.load_compressed(path)


def _rewrite(path, tmp_path, header_fn=None, parts_fn=None, extra=b""):
    """A copy of ``path`` with its header and parts edited and a *valid* checksum."""
    data = path.read_bytes()
    (head_len,) = struct.unpack("<I", data[5:9])
    header = json.loads(zlib.decompress(data[9 : 9 + head_len]))
    parts, off = [], 9 + head_len
    for t in header["t"]:
        parts.append(
            [data[off + sum(t["p"][:i]) : off + sum(t["p"][: i + 1])] for i in range(len(t["p"]))]
        )
        off += sum(t["p"])
    if parts_fn is not None:
        parts_fn(header, parts)
        for t, ps in zip(header["t"], parts, strict=True):
            t["p"] = [len(x) for x in ps]
    if header_fn is not None:
        header = header_fn(header)
    head = zlib.compress(json.dumps(header).encode())
    body = data[:4] + struct.pack("<BI", data[4], len(head)) + head
    body += b"".join(b"".join(ps) for ps in parts) + extra
    out = tmp_path / "edited.dcmp"
    out.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    return out


def _set_first(key, value):
    """Edit the first shared tensor's entry (``fc1.weight``; ``fc1.bias`` comes before it)."""

    def edit(header):
        next(t for t in header["t"] if t["k"] == "shared")[key] = value
        return header

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: [h], "the header is not an object"),
        (lambda h: {**h, "t": {"a": 1}}, "no tensor list"),
        (_set_first("k", "zip"), "unknown storage kind 'zip'"),
        (
            lambda h: {**h, "t": [{k: v for k, v in h["t"][0].items() if k != "s"}, *h["t"][1:]]},
            "bad shape",
        ),
        (_set_first("d", "object"), "unknown dtype"),
        (_set_first("g", {"w": 0}), "bad fixed-width stream"),
        (_set_first("nc", "8"), "bad codebook size"),
        (_set_first("ne", -1), "bad entry count"),
        (lambda h: {**h, "lr": {"fc1": 0}}, "bad low-rank entry"),
        (lambda h: {**h, "arch": ["lenet300"]}, "bad arch"),
    ],
)
def test_malformed_header_with_valid_checksum_fails_clearly(tmp_path, edit, message):
    path = _save(tmp_path, _compressed_tiny(), huffman=False)
    bad = _rewrite(path, tmp_path, header_fn=edit)
    with pytest.raises(C.CompressedFormatError, match=message):
        C.read_compressed(bad)


def test_malformed_content_with_valid_checksum_fails_clearly(tmp_path):
    path = _save(tmp_path, _compressed_tiny(), huffman=False, index_bits=4)
    template = _compressed_tiny()
    # trailing bytes before the checksum
    with pytest.raises(C.CompressedFormatError, match="trailing bytes"):
        C.read_compressed(_rewrite(path, tmp_path, extra=b"\0\0"))

    assert [t["n"] for t in C.read_compressed(path)[1]["t"][:2]] == ["fc1.bias", "fc1.weight"]

    def big_symbol(header, parts):  # fc1.weight: symbols of w bits, the largest past the codebook
        meta = header["t"][1]
        width = meta["v"]["w"]
        assert 2**width - 1 > meta["nc"]
        syms = C.unpack_bits(parts[1][2], width, meta["ne"])
        syms[0] = 2**width - 1
        parts[1][2] = C.pack_bits(syms, width)

    with pytest.raises(C.CompressedFormatError, match=r"codebook index \d+ out of range"):
        C.load_compressed(_rewrite(path, tmp_path, parts_fn=big_symbol), template)

    def short_bias(header, parts):  # fc1.bias is dense float32: drop one byte
        parts[0][0] = parts[0][0][:-1]

    with pytest.raises(C.CompressedFormatError, match="fc1.bias.*wrong byte count"):
        C.read_compressed(_rewrite(path, tmp_path, parts_fn=short_bias))

    def short_stream(header, parts):
        parts[1][1] = parts[1][1][:1]

    with pytest.raises(C.CompressedFormatError, match="corrupt compressed file.*need"):
        C.read_compressed(_rewrite(path, tmp_path, parts_fn=short_stream))
    with pytest.raises(C.CompressedFormatError, match="low-rank layer 'nope'"):
        C.load_compressed(
            _rewrite(path, tmp_path, header_fn=lambda h: {**h, "lr": {"nope": 2}}), template
        )

    def twice(header, parts):  # a consistent file that names fc1.bias twice
        header["t"].append(dict(header["t"][0]))
        parts.append(list(parts[0]))

    with pytest.raises(C.CompressedFormatError, match="'fc1.bias' occurs twice"):
        C.read_compressed(_rewrite(path, tmp_path, parts_fn=twice))

    def short_codebook(header, parts):
        parts[1][0] = parts[1][0][:-4]

    with pytest.raises(C.CompressedFormatError, match="codebook bytes do not match"):
        C.read_compressed(_rewrite(path, tmp_path, parts_fn=short_codebook))

    huff = _save(tmp_path, _compressed_tiny(), huffman=True, index_bits=4)

    def invalid_code(header, parts):  # lengths 1, 2 leave the code 11 unused
        parts[1][1] = bytes([1, 2])
        parts[1][2] = b"\xff" * len(parts[1][2])

    with pytest.raises(C.CompressedFormatError, match="invalid Huffman code"):
        C.read_compressed(_rewrite(huff, tmp_path, parts_fn=invalid_code))
    with pytest.raises(ValueError, match="invalid Huffman code"):
        C.huffman_decode(b"\xc0", [1, 2], 1)  # 11 is no code of lengths (1, 2)
    assert issubclass(C.CompressedFormatError, ValueError)


def test_save_rejects_parametrized_model_and_bad_arguments(tmp_path):
    model = build_model("lenet300", input_size=8)
    C.apply_weight_sharing(model, 2)
    with pytest.raises(ValueError, match="remove_weight_sharing"):
        C.save_compressed(model, tmp_path / "m.dcmp")
    with pytest.raises(TypeError, match="path"):
        C.save_compressed(build_model("lenet300", input_size=8), 3)
    with pytest.raises(TypeError, match="huffman"):
        C.save_compressed(build_model("lenet300", input_size=8), tmp_path / "m", huffman=1)
    with pytest.raises(ValueError, match="index_bits"):
        C.save_compressed(build_model("lenet300", input_size=8), tmp_path / "m", index_bits=0)
    odd = nn.Linear(2, 2)
    odd.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="phase: dtype torch.complex64 cannot be stored"):
        C.save_compressed(odd, tmp_path / "m")


# ------------------------------------------------------------------------- low rank


def test_low_rank_error_matches_eckart_young():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    for r in (1, 4, 12):
        lr = C.LowRankLinear.from_linear(layer, r)
        w = (lr.second.weight @ lr.first.weight).detach().double()
        err = torch.linalg.norm(w - layer.weight.detach().double())
        assert math.isclose(float(err), float(s[r:].pow(2).sum().sqrt()), abs_tol=1e-5)
    x = torch.randn(3, 20)
    assert torch.allclose(C.LowRankLinear.from_linear(layer, 12)(x), layer(x), atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        C.LowRankLinear.from_linear(layer, 13)


def test_rank_for_energy_hand_example():
    w = torch.diag(torch.tensor([4.0, 3.0]))  # energies 16/25 = 0.64 and 1.0
    assert C.rank_for_energy(w, 0.64) == 1
    assert C.rank_for_energy(w, 0.65) == 2
    assert C.rank_for_energy(torch.zeros(4, 4), 0.9) == 1  # no energy: the smallest rank
    assert C.rank_for_energy(torch.zeros(3, 5), 1.0) == 1
    assert C.rank_for_energy(torch.tensor([[0.0, 0.0, 2.0]]), 1.0) == 1
    with pytest.raises(ValueError, match="empty"):
        C.rank_for_energy(torch.zeros(0, 3), 0.5)
    with pytest.raises(ValueError, match="energy"):
        C.rank_for_energy(w, 1.5)
    with pytest.raises(ValueError, match="dimensions"):
        C.rank_for_energy(torch.ones(3), 0.5)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.floats(0.01, 1.0), st.integers(0, 2**16))
def test_rank_for_energy_property_in_range_and_smallest(m, n, energy, seed):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    r = C.rank_for_energy(w, energy)
    assert 1 <= r <= min(m, n)
    s2 = torch.linalg.svdvals(w.double()) ** 2
    assert float(s2[:r].sum()) >= energy * float(s2.sum()) - 1e-9
    assert r == 1 or float(s2[: r - 1].sum()) < energy * float(s2.sum())


def test_factorize_only_when_parameters_shrink():
    square = nn.Sequential(nn.Linear(2, 2))  # rank 1 costs 1 * (2 + 2) = 4 = 2 * 2: no saving
    square[0].weight.data = torch.diag(torch.tensor([3.0, 1.0]))
    assert C.low_rank_ranks(C.factorize_linears(square, energy=0.5)) == {}
    wide = nn.Sequential(nn.Linear(3, 3))  # rank 1 costs 6 < 9
    wide[0].weight.data = torch.diag(torch.tensor([3.0, 1.0, 1.0]))
    assert C.low_rank_ranks(C.factorize_linears(wide, energy=0.5)) == {"0": 1}


def test_factorize_and_rank_for_accuracy(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300", input_size=8)
    C.factorize_linears(model, ranks={"fc1": 8})
    assert C.low_rank_ranks(model) == {"fc1": 8}
    path = _save(tmp_path, model, arch={"model": "lenet300", "input_size": 8})
    loaded = C.load_compressed(path)
    assert C.low_rank_ranks(loaded) == {"fc1": 8}
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="exactly one"):
        C.factorize_linears(model)
    base = build_model("lenet300", input_size=8)
    x = torch.randn(64, 1, 8, 8)
    ref = base(x).argmax(1)

    def agreement(m):  # % of inputs whose prediction is unchanged
        return 100.0 * float((m(x).argmax(1) == ref).float().mean())

    r = C.rank_for_accuracy(base, "fc2", agreement, max_drop=0.0)
    assert agreement(C.factorize_linears(base, ranks={"fc2": r})) == 100.0


# ------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def digits():
    """512 training images of sklearn's digits (8 steps per epoch keep the pipelines fast)."""
    from torch.utils.data import Subset

    s = load_splits("digits")
    return make_loader(Subset(s.train, range(512)), 64, shuffle=True), make_loader(s.test, 256)


class _Recorder:
    """Stand-ins for fit / magnitude_prune / make_kd_loss that record how the pipeline calls them."""

    def __init__(self, monkeypatch):
        self.fits, self.prunes, self.teachers = [], [], []
        real_prune = C.magnitude_prune

        def fit(model, loader, **kw):
            self.fits.append((kw["desc"], kw["epochs"], kw["compute_loss"], kw["device"]))

        def prune(model, amount, **kw):
            self.prunes.append((tuple(kw["layers"]), round(amount, 6)))
            return real_prune(model, amount, **kw)

        def kd(teacher, temperature, alpha):
            self.teachers.append((teacher, temperature, alpha))
            return "kd-loss"

        monkeypatch.setattr(C, "fit", fit)
        monkeypatch.setattr(C, "magnitude_prune", prune)
        monkeypatch.setattr(C, "make_kd_loss", kd)


def test_pipeline_prunes_in_rounds_and_distils_from_the_given_teacher(monkeypatch, digits):
    rec = _Recorder(monkeypatch)
    torch.manual_seed(0)
    model, teacher = build_model("lenet300", input_size=8), build_model("lenet300", input_size=8)
    cfg = C.PipelineConfig(
        sparsity={"fc1": 0.8, "fc2": 0.6, "fc3": 0.3},
        bits=3,
        prune_steps=2,
        prune_epochs=1,
        quant_epochs=2,
        distill=True,
        temperature=3.0,
        alpha=0.7,
    )
    stages = C.deep_compression(model, digits[0], cfg, teacher=teacher)
    assert rec.prunes == [
        (("fc1",), 0.4),
        (("fc2",), 0.3),
        (("fc3",), 0.15),
        (("fc1",), 0.8),
        (("fc2",), 0.6),
        (("fc3",), 0.3),
    ]
    cpu = torch.device("cpu")
    assert rec.fits == [
        ("prune 1", 1, "kd-loss", cpu),
        ("prune 2", 1, "kd-loss", cpu),
        ("centroids", 2, "kd-loss", cpu),
    ]
    assert (
        len(rec.teachers) == 1
        and rec.teachers[0][0] is teacher
        and rec.teachers[0][1:] == (3.0, 0.7)
    )
    q = stages["quantized"]
    for name, s in cfg.sparsity.items():
        w = q.get_submodule(name).weight
        assert int((w == 0).sum()) == round(s * w.numel())  # exact, not approximately
        assert torch.unique(w[w != 0]).numel() <= 2**3
        assert torch.equal(w == 0, stages["pruned"].get_submodule(name).weight == 0)
    for a, b in zip(stages["dense"].parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)  # the dense stage is the untouched input

    rec.teachers.clear()
    C.prune_quantize_distill(model, teacher, digits[0], cfg)
    assert rec.teachers[0][0] is teacher
    rec.teachers.clear()
    stages = C.deep_compression(model, digits[0], cfg)  # default teacher: the dense model
    assert rec.teachers[0][0] is not model
    assert all(
        torch.equal(a, b)
        for a, b in zip(rec.teachers[0][0].parameters(), model.parameters(), strict=True)
    )


def test_low_rank_pipeline_ranks_and_per_factor_settings(monkeypatch, digits):
    rec = _Recorder(monkeypatch)
    torch.manual_seed(0)
    model = build_model("lenet300", input_size=8)
    expected = {}
    for name in ("fc1", "fc2", "fc3"):
        layer = model.get_submodule(name)
        r = C.rank_for_energy(layer.weight, 0.5)
        if r * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features:
            expected[name] = r
    assert expected  # the test needs at least one factorised layer
    cfg = C.PipelineConfig(
        sparsity={"fc1": 0.5, "fc2": 0.4, "fc3": 0.2},
        bits={"fc1": 2, "fc2": 3, "fc3": 4},
        prune_steps=1,
        low_rank_energy=0.5,
    )
    stages = C.deep_compression(model, digits[0], cfg)
    assert list(stages) == ["dense", "low_rank", "pruned", "quantized"]
    assert C.low_rank_ranks(stages["low_rank"]) == C.low_rank_ranks(stages["quantized"]) == expected
    pruned_layers = sorted(layers[0] for layers, _ in rec.prunes)
    names = sorted(
        n
        for name in ("fc1", "fc2", "fc3")
        for n in ([f"{name}.first", f"{name}.second"] if name in expected else [name])
    )
    assert pruned_layers == names  # both factors get the setting of the layer they replaced
    q = stages["quantized"]
    for n in names:
        base = n.split(".")[0]
        w = q.get_submodule(n).weight
        assert int((w == 0).sum()) == round(cfg.sparsity[base] * w.numel())
        assert torch.unique(w[w != 0]).numel() <= 2 ** cfg.bits[base]
    assert [f[0] for f in rec.fits] == ["low rank", "prune 1", "centroids"]


def test_deep_compression_pipeline_on_digits(tmp_path, digits):
    from utils.training import evaluate, fit

    train, test = digits
    torch.manual_seed(0)
    model = build_model("lenet300", input_size=8)
    fit(model, train, epochs=2, progress=False)
    dense_acc = evaluate(model, test)["accuracy"]
    cfg = C.PipelineConfig(
        sparsity={"fc1": 0.8, "fc2": 0.8, "fc3": 0.5},
        bits=4,
        prune_steps=2,
        prune_epochs=1,
        quant_epochs=1,
    )
    stages = C.deep_compression(model, train, cfg)
    assert list(stages) == ["dense", "pruned", "quantized"]
    q = stages["quantized"]
    files = C.stage_files(stages, tmp_path, arch={"model": "lenet300", "input_size": 8})
    sizes = {k: p.stat().st_size for k, p in files.items()}
    assert sizes["dense"] > sizes["pruned"] > sizes["quantized"] > sizes["huffman"]
    loaded = C.load_compressed(files["huffman"])
    x = torch.stack([test.dataset[i][0] for i in range(64)])
    assert torch.equal(loaded(x), q(x))  # the file holds exactly the quantized model
    # 80% of fc1/fc2 pruned and 4-bit shared weights, fine-tuned: within 5 points of dense
    assert evaluate(q, test)["accuracy"] >= dense_acc - 5.0
    assert cfg.as_dict()["bits"] == 4


def test_pipeline_argument_checks(digits):
    train, _ = digits
    model = build_model("lenet300", input_size=8)
    with pytest.raises(TypeError, match="config"):
        C.deep_compression(model, train, {"sparsity": 0.5})
    with pytest.raises(ValueError, match="sparsity"):
        C.prune_finetune(model, train, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        C.prune_finetune(model, train, {"fc1": -0.1})
    with pytest.raises(ValueError, match="steps"):
        C.prune_finetune(model, train, 0.5, steps=0)


def test_compress_baseline_is_cached(tmp_cache, monkeypatch):
    torch.manual_seed(0)
    base = build_model("lenet300", input_size=8)  # stands in for the trained baseline
    monkeypatch.setattr(C, "load_baseline", lambda *a, **k: copy.deepcopy(base))
    cfg = C.PipelineConfig(sparsity=0.5, bits=3, prune_steps=1, prune_epochs=1, quant_epochs=0)
    first = C.compress_baseline("lenet300", "digits", cfg)
    files = sorted(tmp_cache.glob("dc-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = C.compress_baseline("lenet300", "digits", cfg)
    assert sorted(tmp_cache.glob("dc-*.pt")) == files
    assert files[0].stat().st_mtime_ns == stamp  # loaded, not trained and saved again
    for name in ("dense", "pruned", "quantized"):
        for k, v in first[name].state_dict().items():
            assert torch.equal(v, again[name].state_dict()[k])
    assert all(
        torch.equal(a, b)
        for a, b in zip(first["dense"].parameters(), base.parameters(), strict=True)
    )
    assert float((first["quantized"].fc1.weight == 0).float().mean()) == 0.5
    assert all(p.device.type == "cpu" for p in first["quantized"].parameters())
    assert C.baseline_arch("lenet300", "digits") == {
        "model": "lenet300",
        "in_channels": 1,
        "num_classes": 10,
        "input_size": 8,
    }
    with pytest.raises(TypeError, match="config"):
        C.compress_baseline("lenet300", "digits", {"bits": 3})
