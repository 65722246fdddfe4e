"""Tests of utils.lowbit: LSQ, LQ-Nets, binary/ternary weights, bit packing, group-wise INT4, GPTQ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils import lowbit as lb
from utils.benchmark import state_dict_bytes


# ----------------------------------------------------------------- LSQ
def test_lsq_range_and_init():
    assert lb.lsq_range(4) == (8, 7)
    assert lb.lsq_range(2) == (2, 1)
    assert lb.lsq_range(3, signed=False) == (0, 7)
    with pytest.raises(ValueError, match="bits must be >= 2"):
        lb.lsq_range(1)
    # s0 = 2 mean|x| / sqrt(Qp): mean|x| = 1.5, Qp = 7 (4 bits)
    s0 = lb.lsq_init_step(torch.tensor([1.0, -2.0]), 4)
    assert torch.isclose(s0, torch.tensor(3.0 / 7**0.5))
    assert lb.lsq_grad_scale(16, 4) == pytest.approx(1 / (16 * 7) ** 0.5)


def test_lsq_forward_and_gradients_by_hand():
    # 2 bits signed: Qn = 2, Qp = 1, s = 1, g = 1.  x/s = -3, -0.6, 0.3, 0.5, 2
    x = torch.tensor([-3.0, -0.6, 0.3, 0.5, 2.0], requires_grad=True)
    s = torch.tensor([1.0], requires_grad=True)
    y = lb.lsq_fake_quant(x, s, 2, grad_scale=1.0)
    assert y.tolist() == [-2.0, -1.0, 0.0, 0.0, 1.0]  # round half to even at 0.5
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # ∂/∂s: -Qn, round(-0.6)+0.6 = -0.4, -0.3, -0.5, Qp -> sum = -2 -0.4 -0.3 -0.5 +1 = -2.2
    assert s.grad.item() == pytest.approx(-2.2)


def test_lsq_gradients_equal_autograd_of_the_papers_listing():
    torch.manual_seed(1)
    for bits, signed in ((2, True), (3, True), (4, False)):
        x1 = torch.randn(200, requires_grad=True)
        s1 = torch.tensor([0.4], requires_grad=True)
        x2 = x1.detach().clone().requires_grad_()
        s2 = s1.detach().clone().requires_grad_()
        w = torch.randn(200)
        y1 = lb.lsq_fake_quant(x1, s1, bits, signed)
        y2 = lb.lsq_fake_quant_autograd(x2, s2, bits, signed)
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        assert torch.equal(y1, y2)
        assert torch.allclose(x1.grad, x2.grad)
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-5)


def test_lsq_quantizer_learns_its_step():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    q = lb.LSQQuantizer(3)
    q(w)  # initialises the step
    start = float(q.step)
    assert start == pytest.approx(float(lb.lsq_init_step(w, 3)))
    opt = torch.optim.Adam(q.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        ((q(w) - w) ** 2).mean().backward()
        opt.step()
    err_start = ((lb.lsq_fake_quant(w, torch.tensor([start]), 3) - w) ** 2).mean()
    assert ((q(w) - w) ** 2).mean() < err_start
    codes = q.codes(w)
    assert codes.min() >= 0 and codes.max() <= 7


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"step": torch.tensor([0.0])}, ValueError, "step must be > 0"),
        ({"step": torch.ones(2)}, ValueError, "step must have one element"),
        ({"bits": 0}, ValueError, "bits must be >= 1"),
        ({"x": [1.0]}, TypeError, "x must be a torch.Tensor"),
    ],
)
def test_lsq_bad_input(kwargs, err, match):
    args = {"x": torch.ones(3), "step": torch.ones(1), "bits": 4} | kwargs
    with pytest.raises(err, match=match):
        lb.lsq_fake_quant(**args)


# ----------------------------------------------------------------- LQ-Nets
def test_lq_levels_by_hand():
    # v = (1, 2): levels ±1 ±2 = -3, -1, 1, 3 (uniform, as the paper's Fig. 1 starts)
    assert lb.lq_levels(torch.tensor([1.0, 2.0])).tolist() == [-3.0, -1.0, 1.0, 3.0]
    b = lb.lq_encode(torch.tensor([2.6, -0.4]), torch.tensor([1.0, 2.0]))
    assert b.tolist() == [[1.0, 1.0], [-1.0, 1.0]] or b.tolist() == [[1.0, 1.0], [1.0, -1.0]]
    assert (b @ torch.tensor([1.0, 2.0])).tolist()[0] == 3.0


def test_lq_qem_step_solves_least_squares_and_never_increases_error():
    # all elements encode to +1,+1 with v = (1, 2)... use two clusters with known LS answer
    x = torch.tensor([3.2, 2.8, -3.0, 1.1, 0.9, -1.0])
    v = lb.lq_qem_step(x, torch.tensor([1.0, 2.0]))
    b = lb.lq_encode(x, torch.tensor([1.0, 2.0]))
    want = torch.linalg.lstsq(b, x.reshape(-1, 1)).solution.reshape(-1)
    assert torch.allclose(v, want, atol=1e-5)
    torch.manual_seed(0)
    w = torch.randn(2000)
    basis = lb.lq_init_basis(w, 2)
    errors = []
    for _ in range(6):
        errors.append(float(((lb.lq_encode(w, basis) @ basis) - w).pow(2).mean()))
        basis = lb.lq_qem_step(w, basis)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.95 * errors[0]  # the learned basis beats the uniform start


def test_lq_quantizer_uses_at_most_2k_levels_and_updates_in_training():
    torch.manual_seed(0)
    w = torch.randn(16, 8, requires_grad=True)
    q = lb.LQQuantizer(2, momentum=0.5)
    out = q(w)
    assert out.unique().numel() <= 4
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    before = q.basis.clone()
    q.train()
    q(w.detach() * 3)
    assert not torch.equal(before, q.basis)
    q.eval()
    after = q.basis.clone()
    q(w.detach() * 5)
    assert torch.equal(after, q.basis)  # no update in eval mode
    assert q.codes(w.detach()).max() <= 3


# ----------------------------------------------------------------- binary, ternary
def test_binarize_by_hand():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.2, -0.2, 0.2, 0.2]], requires_grad=True)
    out = lb.binarize(w)
    # alpha = mean|w| per row = 1.0 and 0.2; sign(0) = +1
    assert torch.allclose(out, torch.tensor([[1.0, -1.0, 1.0, 1.0], [-0.2, -0.2, 0.2, 0.2]]))
    out.sum().backward()
    # STE clipped at |w| <= 1 (BinaryConnect); alpha is treated as a constant
    assert (w.grad != 0).tolist() == [[True, False, True, False], [True, True, True, True]]


def test_ternarize_by_hand():
    w = torch.tensor([[0.1, -0.6, 1.5, -1.8]])
    # Delta = 0.7 * mean|w| = 0.7 * 1.0 = 0.7; kept: 1.5, -1.8 (not -0.6); alpha = 1.65
    out = lb.ternarize(w)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 1.65, -1.65]]))
    assert lb.Ternarizer().codes(w).tolist() == [[1, 1, 2, 0]]
    with pytest.raises(ValueError, match="output-channel"):
        lb.ternarize(torch.ones(3))


# ----------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_round_trip_and_real_bytes(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (37,))
    packed = lb.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-37 * bits // 8)  # ceil(n·b / 8) bytes
    assert torch.equal(lb.unpack_bits(packed, bits, 37), codes)
    # the byte-aligned fast path writes the same bytes as the general bit stream
    stream = ((codes.unsqueeze(1) >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    assert torch.equal(packed, (stream << torch.arange(8)).sum(1).to(torch.uint8))


def test_pack_bits_layout_by_hand():
    # 4 bits, low nibble first: codes 1, 2 -> 0x21; 1 bit: 1,0,1,1,0,0,0,0 -> 0b00001101
    assert lb.pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert lb.pack_bits(torch.tensor([1, 0, 1, 1]), 1).tolist() == [0b1101]
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        lb.pack_bits(torch.tensor([16]), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        lb.pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(TypeError, match="uint8"):
        lb.unpack_bits(torch.tensor([1]), 4, 1)


# ----------------------------------------------------------------- group-wise INT4 and GPTQ
def test_quantize_groupwise_by_hand():
    w = torch.tensor([[0.0, 1.5, -1.5, 3.0]])  # one group of 4, 2 bits
    gq = lb.quantize_groupwise(w, bits=2, group_size=4)
    # S = (3 - -1.5) / 3 = 1.5, Z = round(1.5/1.5) = 1; q = round(w/S) + 1 = 1, 2, 0, 3
    assert gq.scale.tolist() == [[1.5]] and gq.zero.tolist() == [[1]]
    assert gq.codes.tolist() == [[1, 2, 0, 3]]
    assert torch.equal(gq.dequantize(), w)
    # all-positive group: the range is widened to [0, 4] -> S = 4/3, Z = 0
    gq = lb.quantize_groupwise(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), bits=2, group_size=4)
    assert gq.zero.tolist() == [[0]] and torch.allclose(gq.scale, torch.tensor([[4 / 3]]))
    assert gq.codes.tolist() == [[1, 2, 2, 3]]
    with pytest.raises(ValueError, match="group_size must divide"):
        lb.quantize_groupwise(torch.ones(2, 6), 4, 4)


def test_groupwise_error_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    gq = lb.quantize_groupwise(w, 4, 32)
    step = gq.scale.repeat_interleave(32, dim=1)
    assert ((gq.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert gq.codes.max() <= 15


def _correlated_inputs(n=512, d=128):
    torch.manual_seed(0)
    return torch.randn(n, d) @ torch.randn(d, d) * 0.3 + torch.randn(n, d)


def test_gptq_error_not_above_rtn_on_a_random_layer():
    x = _correlated_inputs()
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    h = x.T @ x
    for bits in (2, 3, 4):
        gptq = lb.gptq_quantize(w, h, bits, 32).dequantize()
        rtn = lb.quantize_groupwise(w, bits, 32).dequantize()
        e_g, e_r = lb.layer_output_error(w, gptq, x), lb.layer_output_error(w, rtn, x)
        assert e_g < 0.9 * e_r, f"{bits} bits: GPTQ {e_g:.4g} vs RTN {e_r:.4g}"


def test_gptq_with_identity_hessian_is_round_to_nearest():
    # H = I: no correlation to exploit, the OBQ update U_ij = 0 for j > i: plain rounding
    torch.manual_seed(2)
    w = torch.randn(4, 64)
    g = lb.gptq_quantize(w, torch.eye(64), 4, 16, damp=0.0)
    r = lb.quantize_groupwise(w, 4, 16)
    assert torch.equal(g.codes, r.codes)
    with pytest.raises(ValueError, match="hessian must be 64×64"):
        lb.gptq_quantize(w, torch.eye(8), 4, 16)


def test_packed_linear_matches_and_counts_real_bytes():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    model = nn.Sequential(lin)
    gq = lb.quantize_groupwise(lin.weight, 4, 32)
    want = nn.functional.linear(torch.ones(2, 128), gq.dequantize(), lin.bias)
    lb.quantize_linears_(model, method="rtn", bits=4, group_size=32)
    packed = model[0]
    assert isinstance(packed, lb.PackedLinear)
    assert torch.allclose(packed(torch.ones(2, 128)), want, atol=1e-2)  # FP16 scales
    assert packed.qweight.numel() == 64 * 128 // 2  # two 4-bit codes per byte
    assert torch.equal(packed.group_quant().codes, gq.codes)
    assert state_dict_bytes(model) < state_dict_bytes(nn.Sequential(lin)) / 4


def test_quantize_linears_gptq_uses_hessians():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = _correlated_inputs(256, 64)

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inputs):
            return self.m(inputs)

    hess = lb.linear_hessians(Wrap(model), [{"inputs": x[:100]}, {"inputs": x[100:]}])
    assert set(hess) == {"m.0", "m.2"}
    assert torch.allclose(hess["m.0"], (x.T @ x).double(), rtol=1e-4)
    with pytest.raises(ValueError, match="needs hessians"):
        lb.quantize_linears_(model, method="gptq")
    ref = model[0].weight.detach().clone()
    lb.quantize_linears_(
        model, method="gptq", bits=3, group_size=32, hessians={"0": hess["m.0"], "2": hess["m.2"]}
    )
    w_hat = model[0].group_quant().dequantize()
    rtn = lb.quantize_groupwise(ref, 3, 32).dequantize()
    assert lb.layer_output_error(ref, w_hat, x) < lb.layer_output_error(ref, rtn, x)


# ----------------------------------------------------------------- model-level QAT
@pytest.mark.parametrize(
    "method, bits, per_weight",
    [("lsq", 3, 3), ("lqnet", 2, 2), ("binary", 1, 1), ("ternary", 2, 2)],
)
def test_quantize_weights_and_packed_size(method, bits, per_weight):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    fp32 = {k: v.clone() for k, v in model.state_dict().items()}
    lb.quantize_weights_(model, method, bits)
    x = torch.randn(2, 1, 8, 8)
    model(x).sum().backward()  # trains: gradients reach the FP32 weights underneath
    conv = model[0]
    assert conv.parametrizations.weight.original.grad is not None
    wq = conv.weight.detach().reshape(4, -1)
    assert max(row.unique().numel() for row in wq) <= 2**per_weight  # levels per output channel
    state = lb.packed_state(model)
    n_weights = 4 * 9 + 10 * 144
    code_bytes = state["0.codes"].numel() + state["2.codes"].numel()
    assert code_bytes == -(-36 * per_weight // 8) + -(-1440 * per_weight // 8)
    assert lb.serialized_bytes(state) < lb.serialized_bytes(fp32)
    assert code_bytes * 8 <= n_weights * per_weight + 16
    with pytest.raises(ValueError, match="method must be one of"):
        lb.quantize_weights_(nn.Linear(2, 2), "xnor", 1)


def _gptq_unblocked(w, h, bits, group_size, damp=0.01):
    """Frantar et al. 2023, Alg. 1 without lazy batches: every column updates all later ones at once."""
    W = w.double().clone()
    H = h.double().clone() + damp * torch.diag(h.double()).mean() * torch.eye(
        h.shape[0], dtype=torch.float64
    )
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W, dtype=torch.long)
    for i in range(W.shape[1]):
        if i % group_size == 0:
            scale, zero = lb.group_params(W[:, i : i + group_size], bits)
        q = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, 2**bits - 1)
        codes[:, i] = q.long()
        err = (W[:, i] - scale * (q - zero)) / U[i, i]
        W[:, i + 1 :] -= err.unsqueeze(1) * U[i, i + 1 :].unsqueeze(0)
    return codes


def test_gptq_lazy_blocks_equal_the_unblocked_algorithm():
    # 320 inputs, groups of 32: blocks of 128, 128 and 64 columns, so errors cross blocks
    x = _correlated_inputs(600, 320)
    torch.manual_seed(3)
    w = torch.randn(16, 320)
    got = lb.gptq_quantize(w, x.T @ x, 3, 32).codes
    want = _gptq_unblocked(w, x.T @ x, 3, 32)
    assert (got == want).float().mean() > 0.999
