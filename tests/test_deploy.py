"""Tests of ``utils.deploy``: runners per backend, their agreement with eager, the FX fusion pass."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from utils.cache import load_baseline
from utils.data import load_splits
from utils.deploy import (
    BACKENDS,
    FP32_ATOL,
    BackendUnavailable,
    ExportError,
    OrtCalibrationReader,
    Runner,
    calibration_batches,
    check_agreement,
    export_runners,
    fold_conv_bn,
    fuse_conv_bn_fx,
    fx_op_counts,
    onnx_op_counts,
    ort_op_counts,
    set_executorch_threads,
    set_tvm_threads,
    tvm_mcpu,
)
from utils.models import SmallMobileNet, SmallResNet

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_ONNX_EXPORT = HAS_ORT and importlib.util.find_spec("onnxscript") is not None
HAS_OV = importlib.util.find_spec("openvino") is not None
HAS_NNCF = importlib.util.find_spec("nncf") is not None


# ----------------------------------------------------------------- shared data and runners
@pytest.fixture(scope="module")
def mnist():
    """Real MNIST: 256 test digits with labels, 128 validation digits for calibration."""
    s = load_splits("mnist5k")
    x, y = s.test.tensors
    return x[:256].float(), y[:256], s.val.tensors[0][:128].float()


@pytest.fixture(scope="module")
def lenet5():
    return load_baseline("lenet5", "mnist5k")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def runners(lenet5, mnist, workdir):
    """The trained LeNet-5 exported once to every installed backend that needs no compiler."""
    names = ["eager", "export"] + [n for n in BACKENDS if n.startswith(("onnxrt", "openvino"))]
    names += ["litert", "coreml", "tensorrt"]
    return export_runners(lenet5, mnist[0][:4], backends=names, calib=mnist[2], workdir=workdir)


def _bn_with_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, so folding is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


# ----------------------------------------------------------------- the runner and the registry
def test_registry_names_every_backend_of_the_issue():
    expected = {"eager", "compile", "export", "onnxrt-int8", "openvino", "openvino-int8", "tvm"}
    expected |= {f"onnxrt-{lvl}" for lvl in ("disable", "basic", "extended", "all")}
    expected |= {"executorch", "litert", "coreml", "tensorrt"}
    assert set(BACKENDS) == expected
    assert {n for n, b in BACKENDS.items() if b.precision == "int8"} == {
        "onnxrt-int8",
        "openvino-int8",
    }


def test_runner_checks_shape_and_returns_float_cpu_logits():
    r = Runner("toy", lambda x: x.flatten(1)[:, :3].double().numpy(), (1, 2, 2))
    out = r(torch.arange(8.0).reshape(2, 1, 2, 2))
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    assert torch.equal(out, torch.tensor([[0.0, 1, 2], [4, 5, 6]]))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 2, 2\).*'toy'"):
        r(torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="x must have shape"):
        r(torch.zeros(1, 2, 2))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        r([[1.0]])


def test_bad_inputs_of_export_runners(lenet5):
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"backend must be one of \[.*'eager'.*got 'tflite'"):
        export_runners(lenet5, x, backends=["tflite"])
    with pytest.raises(TypeError, match="backends must be a list of names"):
        export_runners(lenet5, x, backends="eager")
    with pytest.raises(
        ValueError, match=r"calib .* required for the INT8 backends \['onnxrt-int8'\]"
    ):
        export_runners(lenet5, x, backends=["onnxrt-int8"])
    with pytest.raises(
        ValueError, match=r"example of shape \(2, 1, 20, 20\) does not fit the model"
    ):
        export_runners(lenet5, torch.zeros(2, 1, 20, 20), backends=["eager"])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_runners(lambda x: x, x, backends=["eager"])
    with pytest.raises(TypeError, match="calib must be Tensor or DataLoader"):
        export_runners(lenet5, x, backends=["eager"], calib=[x])


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.export cannot trace it
            return x.flatten(1)
        return -x.flatten(1)


def test_a_model_that_cannot_be_exported_raises_export_error():
    with pytest.raises(
        ExportError, match="backend 'export' could not export the model: torch.export"
    ):
        export_runners(_DataDependent(), torch.ones(2, 1, 2, 2), backends=["export"])


def test_runners_use_an_eval_copy_and_leave_the_model_alone():
    net = _bn_with_stats(SmallResNet(widths=(4, 4, 4))).train()
    x = torch.randn(8, 1, 28, 28)
    eager = export_runners(net, x, backends=["eager"])["eager"]
    assert net.training, "export_runners must not change the caller's model"
    ref = net.eval()(x)
    assert torch.allclose(eager(x), ref, atol=1e-6), "the runner must run the model in eval mode"


# ----------------------------------------------------------------- check_agreement
def _shifted(name, ref, precision="fp32", shift=0.0, flip=None):
    """A runner returning ``ref``'s logits plus ``shift``, its prediction changed on the inputs ``flip``."""
    rows = None if flip is None else flip.flatten(1)

    def fn(x):
        out = ref(x) + shift
        if rows is not None:
            hit = (x.flatten(1)[:, None, :] == rows[None]).all(-1).any(-1)
            out[hit] = out[hit].roll(1, dims=1)
        return out

    return Runner(name, fn, (1, 4, 4), precision=precision)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.randn(200, 1, 4, 4)
    with torch.no_grad():
        labels = net(x).argmax(1)
        labels[:10] = (labels[:10] + 1) % 10  # reference accuracy 95 %
    return net, x, labels


def test_fp32_agreement_uses_the_max_abs_logit_diff(toy):
    net, x, _ = toy
    assert FP32_ATOL == 1e-3, "the tolerance the lesson states"
    ok = check_agreement(_shifted("a", net, shift=9e-4), net, x)
    assert ok["passed"] and ok["max_abs_diff"] == pytest.approx(9e-4, rel=1e-2)
    bad = check_agreement(_shifted("b", net, shift=2e-3), net, x)
    assert not bad["passed"] and bad["agreement"] == 1.0, "same predictions, logits too far apart"
    assert check_agreement(_shifted("c", net, shift=2e-3), net, x, atol=3e-3)["passed"]


def test_int8_agreement_counts_predictions_and_accuracy(toy):
    net, x, labels = toy
    one = check_agreement(_shifted("q", net, "int8", shift=0.5, flip=x[:1]), net, x, labels)
    assert one["agreement"] == pytest.approx(199 / 200)
    assert one["max_abs_diff"] > 0.4 and one["passed"], "INT8 is judged on predictions, not logits"
    assert one["reference_accuracy"] == pytest.approx(95.0)
    assert one["accuracy_delta"] == pytest.approx(one["accuracy"] - 95.0)
    three = check_agreement(_shifted("q", net, "int8", flip=x[-3:]), net, x)
    assert three["agreement"] == pytest.approx(197 / 200) and not three["passed"], "98.5 % < 99 %"
    assert three["accuracy_delta"] != three["accuracy_delta"], "NaN without labels"


def test_int8_fails_on_an_accuracy_drop_over_one_point(toy):
    net, x, labels = toy
    x, y = x[10:], labels[10:]  # 190 inputs the reference gets right
    flip2 = _shifted("q", net, "int8", flip=x[:2])  # 2 wrong: 98.9 % agreement, -1.05 points
    res = check_agreement(flip2, net, x, y, min_agreement=0.98)
    assert res["agreement"] >= 0.98 and res["accuracy_delta"] == pytest.approx(-200 / 190, rel=1e-5)
    assert not res["passed"], "an accuracy drop of 1.05 points is more than 1 point"
    assert check_agreement(flip2, net, x, y, min_agreement=0.98, max_acc_drop=1.1)["passed"]
    assert check_agreement(flip2, net, x, min_agreement=0.98)["passed"], "no labels: agreement only"


def test_check_agreement_reads_loaders_and_rejects_bad_input(toy):
    net, x, labels = toy
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=64)
    r = _shifted("q", net, "int8", flip=x[50:51])
    from_loader = check_agreement(r, net, loader)
    assert from_loader == check_agreement(r, net, x, labels)
    with pytest.raises(ValueError, match="labels must have 200 entries"):
        check_agreement(r, net, x, labels[:5])
    with pytest.raises(ValueError, match="labels must be None when inputs is a DataLoader"):
        check_agreement(r, net, loader, labels)
    with pytest.raises(TypeError, match="runner must be Runner"):
        check_agreement(net, net, x)
    with pytest.raises(ValueError, match="min_agreement must be <= 1"):
        check_agreement(r, net, x, min_agreement=99.0)


# ----------------------------------------------------------------- calibration data
def test_calibration_reader_yields_each_real_batch_once():
    data = torch.arange(5 * 6.0).reshape(5, 6)
    batches = calibration_batches(data, max_batches=2)
    assert len(batches) == 1 and batches[0].shape == (5, 6)  # 5 rows fit one batch of 32
    batches = [data[:2], data[2:4], data[4:]]
    reader = OrtCalibrationReader("x", batches)
    seen = []
    while (item := reader.get_next()) is not None:
        seen.append(item["x"])
    assert [s.tolist() for s in seen] == [b.tolist() for b in batches]
    reader.rewind()
    assert reader.get_next()["x"].tolist() == batches[0].tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data, torch.zeros(5)), batch_size=2
    )
    got = calibration_batches(loader, max_batches=2)
    assert [g.tolist() for g in got] == [data[:2].tolist(), data[2:4].tolist()]
    with pytest.raises(ValueError, match="calib must hold at least one batch"):
        calibration_batches(torch.zeros(0, 3))


# ----------------------------------------------------------------- the backends on a trained model
def test_eager_and_export_agree_exactly(runners, lenet5, mnist):
    x = mnist[0]
    assert torch.equal(runners["eager"](x), lenet5(x))
    res = check_agreement(runners["export"], runners["eager"], x, mnist[1])
    assert res["passed"] and res["max_abs_diff"] <= 1e-5
    assert runners["export"].graph_ops["aten.conv2d.default"] == 2


@pytest.mark.skipif(not HAS_ONNX_EXPORT, reason="needs onnxruntime and onnxscript")
def test_onnxruntime_levels_agree_and_fuse(runners, mnist):
    x, y, _ = mnist
    for lvl in ("disable", "basic", "extended", "all"):
        r = runners[f"onnxrt-{lvl}"]
        res = check_agreement(r, runners["eager"], x, y)
        assert res["passed"], (lvl, res)
    ops = {lvl: runners[f"onnxrt-{lvl}"].graph_ops for lvl in ("disable", "extended")}
    assert ops["disable"]["Conv"] == 2 and ops["disable"]["Relu"] == 1
    assert ops["extended"].get("Relu", 0) == 0, "level 'extended' fuses Gemm/Conv + Relu"
    assert sum(ops["extended"].values()) < sum(ops["disable"].values())


@pytest.mark.skipif(not HAS_ONNX_EXPORT, reason="needs onnxruntime and onnxscript")
def test_onnxruntime_int8_static_qdq_passes_the_int8_check(runners, mnist, workdir):
    x, y, _ = mnist
    import onnx

    model = onnx.load(str(workdir / "model-int8.onnx"))
    scales = {i.name: tuple(i.dims) for i in model.graph.initializer if "scale" in i.name}
    assert (20,) in scales.values() and (50,) in scales.values(), "per-channel weight scales"
    r = runners["onnxrt-int8"]
    assert r.precision == "int8" and r.graph_ops["QuantizeLinear"] >= 2
    assert r.file_bytes < 0.4 * runners["onnxrt-disable"].file_bytes, "INT8 weights: ~4x smaller"
    res = check_agreement(r, runners["eager"], x, y)
    assert res["passed"], res
    assert res["max_abs_diff"] > 1e-4, "INT8 logits are not FP32 logits"


@pytest.mark.skipif(not (HAS_OV and HAS_ONNX_EXPORT), reason="needs openvino and onnxscript")
def test_openvino_fp32_and_int8(runners, mnist):
    x, y, _ = mnist
    assert check_agreement(runners["openvino"], runners["eager"], x, y)[
        "passed"
    ]  # from the ONNX file
    if not HAS_NNCF:
        assert isinstance(runners["openvino-int8"], BackendUnavailable)
        return
    r = runners["openvino-int8"]
    res = check_agreement(r, runners["eager"], x, y)
    assert r.precision == "int8" and res["passed"], res


def test_unavailable_backends_say_what_is_missing(runners):
    for name, needle in [
        ("litert", "ai-edge-torch"),
        ("coreml", "macOS"),
        ("tensorrt", "NVIDIA GPU"),
    ]:
        r = runners[name]
        if isinstance(r, Runner):  # installed and working here
            continue
        assert isinstance(r, BackendUnavailable) and r.backend == name
        assert needle in r.reason and needle in str(r)


@pytest.mark.skipif(
    importlib.util.find_spec("coremltools") is None or sys.platform == "darwin",
    reason="needs coremltools on Linux",
)
def test_coreml_row_says_it_converts_here_but_cannot_predict(runners, workdir):
    r = runners["coreml"]
    assert isinstance(r, BackendUnavailable)
    assert "converts the model here (ML program" in r.reason, r.reason
    assert "MLModel.predict runs only on Apple's Core ML" in r.reason
    assert (workdir / "model.mlpackage").is_dir()


def test_ort_op_counts_per_level(runners, tmp_path):
    if not HAS_ONNX_EXPORT:
        pytest.skip("needs onnxruntime and onnxscript")
    net = _bn_with_stats(SmallResNet(widths=(4, 4, 4)))
    export_runners(net, torch.randn(2, 1, 28, 28), backends=["onnxrt-disable"], workdir=tmp_path)
    counts = ort_op_counts(tmp_path / "model.onnx")
    assert counts["disable"] == onnx_op_counts(tmp_path / "model.onnx")
    assert "BatchNormalization" not in counts["disable"], "the exporter's optimiser folds BN"
    assert counts["disable"]["Conv"] == 9 and counts["disable"]["Relu"] == 7
    assert counts["extended"]["FusedConv"] == 4, "Conv+Relu pairs (stem, 3 x relu1)"
    with pytest.raises(TypeError, match="onnx_path must be str or Path"):
        ort_op_counts(3)


# ----------------------------------------------------------------- FX fusion
def test_fold_conv_bn_hand_checked():
    conv = nn.Conv2d(1, 1, 1, bias=True)
    conv.weight.data.fill_(2.0)
    conv.bias.data.fill_(1.0)
    bn = nn.BatchNorm2d(1, eps=0.5).eval()
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(3.5)
    bn.weight.data.fill_(6.0)
    bn.bias.data.fill_(0.5)
    fused = fold_conv_bn(conv, bn)
    # s = 6 / sqrt(3.5 + 0.5) = 3; W' = 2 * 3 = 6; b' = (1 - 3) * 3 + 0.5 = -5.5
    assert fused.weight.item() == 6.0 and fused.bias.item() == -5.5
    x = torch.randn(2, 1, 3, 3)
    assert torch.allclose(fused(x), bn(conv(x)))
    with pytest.raises(TypeError, match="bn must be BatchNorm2d"):
        fold_conv_bn(conv, nn.ReLU())


@pytest.mark.parametrize(
    ("factory", "bn", "conv_relu", "relu_left"),
    [
        (lambda: SmallResNet(widths=(8, 16, 16)), 9, 4, 3),
        (lambda: SmallMobileNet(width_mult=0.5), 11, 11, 0),
    ],
)
def test_fuse_conv_bn_fx_matches_the_model_and_torch_ao(factory, bn, conv_relu, relu_left):
    net = _bn_with_stats(factory())
    before = fx_op_counts(torch.fx.symbolic_trace(net))
    gm = fuse_conv_bn_fx(net)
    after = fx_op_counts(gm)
    assert before["BatchNorm2d"] == bn and "BatchNorm2d" not in after
    assert after["ConvReLU2d"] == conv_relu and after.get("ReLU", 0) == 0
    assert after.get("relu", 0) == relu_left, "ReLU after an add stays (no conv to fuse into)"
    assert "Identity" not in after
    assert sum(after.values()) == sum(before.values()) - bn - conv_relu - before.get("Identity", 0)
    x = torch.randn(4, 1, 28, 28)
    ao = torch.ao.quantization.fuse_modules(net, net.fuse_groups(), inplace=False)
    with torch.no_grad():
        ref, out, ref_ao = net(x), gm(x), ao(x)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    assert torch.allclose(out, ref_ao, atol=1e-5), (out - ref_ao).abs().max()


def test_fuse_conv_bn_fx_removes_noops_and_rejects_untraceable():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Identity(), nn.ReLU()
    )
    net = _bn_with_stats(net).train()
    gm = fuse_conv_bn_fx(net)
    assert fx_op_counts(gm) == {"Conv2d": 1, "ReLU": 1}, "dropout sits between conv and relu"
    assert net.training, "the caller's model is not put in eval mode"
    x = torch.randn(3, 1, 5, 5)
    assert torch.allclose(gm(x), net.eval()(x), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be traced by torch.fx"):
        fuse_conv_bn_fx(_DataDependent())


# ----------------------------------------------------------------- compilers (slow: tiny models)
def test_torch_compile_runner_on_a_tiny_model():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 1, 4, 4)
    r = export_runners(net, x, backends=["compile"])["compile"]
    if isinstance(r, BackendUnavailable):
        assert "C++ compiler" in r.reason
        return
    assert check_agreement(r, net, x)["passed"]


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="needs executorch")
def test_executorch_and_tvm_use_the_policy_thread_count(monkeypatch):
    monkeypatch.setenv("COURSE_THREADS", "1")
    assert set_executorch_threads(1) == 1
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).eval()
    set_executorch_threads(2)  # the pool starts with one thread per CPU
    r = export_runners(net, torch.randn(2, 1, 4, 4), backends=["executorch"])["executorch"]
    assert "1 thread(s)" in r.notes
    lib = importlib.import_module("executorch.extension.pybindings.portable_lib")
    assert lib._threadpool_get_thread_count() == 1
    with pytest.raises(ValueError, match="threads must be"):
        set_executorch_threads(0)
    if importlib.util.find_spec("tvm") is not None:
        assert set_tvm_threads(1) == 1
        with pytest.raises(ValueError, match="threads must be"):
            set_tvm_threads(0)


def test_tvm_mcpu_follows_the_cpu_features():
    none = dict.fromkeys(("AVX2", "FMA", "AVX-512", "AVX-512 VNNI", "NEON"), False)
    assert tvm_mcpu(none) == "x86-64"
    assert tvm_mcpu({**none, "AVX2": True}) == "x86-64", "haswell needs FMA too"
    assert tvm_mcpu({**none, "AVX2": True, "FMA": True}) == "haswell"
    assert tvm_mcpu({**none, "AVX2": True, "FMA": True, "AVX-512": True}) == "skylake-avx512"
    assert tvm_mcpu({**none, "AVX-512": True, "AVX-512 VNNI": True}) == "cascadelake"
    assert tvm_mcpu({**none, "NEON": True}) == ""
    with pytest.raises(TypeError, match="features must be dict"):
        tvm_mcpu(["AVX2"])


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="needs executorch")
def test_executorch_runner_on_a_tiny_model():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 1, 4, 4)
    r = export_runners(net, x, backends=["executorch"])["executorch"]
    assert isinstance(r, Runner) and r.file_bytes > 0
    assert check_agreement(r, net, x)["passed"]
    x3 = torch.randn(3, 1, 4, 4)
    assert torch.allclose(r(x3), net(x3), atol=FP32_ATOL), "a new batch size is lowered again"


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="needs apache-tvm")
def test_tvm_runner_on_a_tiny_model():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 1, 4, 4)
    r = export_runners(net, x, backends=["tvm"])["tvm"]
    from utils.benchmark import cpu_features

    assert isinstance(r, Runner) and f"mcpu={tvm_mcpu(cpu_features()) or 'host'}," in r.notes
    assert check_agreement(r, net, x)["passed"]
    x3 = torch.randn(3, 1, 4, 4)
    assert torch.allclose(r(x3), net(x3), atol=FP32_ATOL), "a new batch size compiles again"


class _Branch(nn.Module):
    """A conv whose output feeds a BN and the residual add: folding the BN would change both."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fuse_conv_bn_fx_keeps_a_bn_whose_conv_feeds_other_nodes():
    net = _bn_with_stats(_Branch())
    gm = fuse_conv_bn_fx(net)
    assert fx_op_counts(gm)["BatchNorm2d"] == 1
    x = torch.randn(2, 1, 5, 5)
    assert torch.allclose(gm(x), net(x), atol=1e-6)
