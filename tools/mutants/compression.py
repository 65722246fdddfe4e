"""Mutants of utils/compression.py: plausible Deep Compression bugs that tests/test_compression.py must catch."""

from mutate import Mutant

TESTS = ["tests/test_compression.py"]
P = "utils/compression.py"

MUTANTS = [
    # --- weight sharing
    Mutant(
        "pruned zeros share index 0 with the first cluster",
        P,
        "indices[nz] = labels + 1",
        "indices[nz] = labels",
    ),
    Mutant(
        "centroids initialised to cluster sums, not means",
        P,
        "counts = torch.bincount(idx, minlength=k).clamp(min=1)",
        "counts = torch.ones(k, dtype=weight.dtype, device=weight.device)",
    ),
    Mutant(
        "codebook_of does not shift the indices after the zero",
        P,
        "indices = torch.where(inverse < z, inverse + 1, inverse)",
        "indices = inverse + 1",
    ),
    # --- Huffman and bit packing
    Mutant(
        "Huffman depth counted twice",
        P,
        "            lengths[s] += 1",
        "            lengths[s] += 2",
    ),
    Mutant(
        "canonical code not shifted by the length difference",
        P,
        "code <<= n - prev",
        "code <<= max(n - prev - 1, 0)",
    ),
    Mutant(
        "Kraft inequality not checked",
        P,
        "if sum(2.0**-n for n, _ in order) > 1 + 1e-12:",
        "if False:",
    ),
    Mutant(
        "invalid Huffman code not detected (reads on until the stream ends)",
        P,
        "elif length > max_len:",
        "elif False:",
    ),
    Mutant(
        "pack_bits accepts values that do not fit",
        P,
        "if v.size and (v.min() < 0 or v.max() >= 2**width):",
        "if False:",
    ),
    Mutant(
        "unpack_bits does not check the stream length",
        P,
        "if bits.size < n * width:",
        "if False:",
    ),
    # --- relative indices
    Mutant(
        "relative index max gap 2**b (does not fit in b bits)",
        P,
        "    m = 2**index_bits\n",
        "    m = 2**index_bits + 1\n",
    ),
    Mutant(
        "relative index max gap 2**b - 2 (a filler too early)",
        P,
        "    m = 2**index_bits\n",
        "    m = 2**index_bits - 1\n",
    ),
    Mutant(
        "negative gaps accepted by the decoder",
        P,
        "if gaps.size and gaps.min() < 0:",
        "if False:",
    ),
    Mutant(
        "positions past numel accepted (>= vs >)",
        P,
        "if pos.size and pos[-1] >= numel:",
        "if pos.size and pos[-1] > numel:",
    ),
    # --- the file format
    Mutant(
        "sparse storage chosen even when it is larger",
        P,
        "if gaps.size * (32 + ib) >= 32 * flat.size:",
        "if False:",
    ),
    Mutant(
        "magic bytes not checked",
        P,
        "if len(data) < 13 or data[:4] != MAGIC:",
        "if len(data) < 13:",
    ),
    Mutant(
        "checksum not checked",
        P,
        "if zlib.crc32(data[:-4]) != crc:",
        "if False:",
    ),
    Mutant(
        "trailing bytes accepted",
        P,
        "if len(data) != need:",
        "if len(data) < need:",
    ),
    Mutant(
        "unknown storage kind accepted",
        P,
        't.get("k") in KINDS,',
        "True,",
    ),
    Mutant(
        "tensor shape not validated",
        P,
        'isinstance(t.get("s"), list) and all(_is_int(d) for d in t["s"])',
        "True",
    ),
    Mutant(
        "duplicate tensor names accepted",
        P,
        "_need(not twice,",
        "_need(True,",
    ),
    Mutant(
        "codebook index out of range not checked",
        P,
        'if syms.size and syms.max() > meta["nc"]:',
        "if False:",
    ),
    Mutant(
        "codebook index nc rejected (> vs >=)",
        P,
        'if syms.size and syms.max() > meta["nc"]:',
        'if syms.size and syms.max() >= meta["nc"]:',
    ),
    Mutant(
        "dense byte count not checked",
        P,
        "_need(len(parts[0]) == numel * np.dtype(np_dtype).itemsize,",
        "_need(True,",
    ),
    Mutant(
        "sparse value count not checked",
        P,
        "_need(len(parts[ng]) == 4 * n,",
        "_need(True,",
    ),
    Mutant(
        "codebook size not checked",
        P,
        '_need(len(parts[0]) == 4 * meta["nc"],',
        "_need(True,",
    ),
    Mutant(
        "file_breakdown books the shared index stream as weights",
        P,
        'out["index"] += sum(p[1 : 1 + ng])',
        'out["weights"] += sum(p[1 : 1 + ng])',
    ),
    Mutant(
        "file_breakdown books the sparse index stream as weights",
        P,
        'out["index"] += sum(p[:ng])',
        'out["weights"] += sum(p[:ng])',
    ),
    # --- low rank
    Mutant(
        "SVD factors not split by the square root of sigma",
        P,
        "root = s[:rank].sqrt()",
        "root = s[:rank]",
    ),
    Mutant(
        "zero matrix gets the full rank",
        P,
        "if total == 0:\n        return 1",
        "if total == 0:\n        return s.numel()",
    ),
    Mutant(
        "factorised when the parameters do not shrink (< vs <=)",
        P,
        "< m.in_features * m.out_features",
        "<= m.in_features * m.out_features",
    ),
    # --- pipelines
    Mutant(
        "pipeline prunes in one shot instead of rounds",
        P,
        "magnitude_prune(model, s * t / steps, layers=[name])",
        "magnitude_prune(model, s, layers=[name])",
    ),
    Mutant(
        "pipeline ignores the given teacher",
        P,
        'teacher if teacher is not None else stages["dense"], config.temperature, config.alpha',
        'stages["dense"], config.temperature, config.alpha',
    ),
    Mutant(
        "pipeline swaps temperature and alpha",
        P,
        'teacher if teacher is not None else stages["dense"], config.temperature, config.alpha',
        'teacher if teacher is not None else stages["dense"], config.alpha, config.temperature',
    ),
    Mutant(
        "pipeline fine-tunes the centroids for prune_epochs",
        P,
        "epochs=config.quant_epochs,",
        "epochs=config.prune_epochs,",
    ),
    Mutant(
        "pruned stage keeps its masks (not made permanent)",
        P,
        "return make_permanent(model).eval()",
        "return model.eval()",
    ),
    Mutant(
        "per-layer settings not passed to the low-rank factors",
        P,
        'out[f"{name}.first"] = out[f"{name}.second"] = value',
        "out[name] = value",
    ),
]
