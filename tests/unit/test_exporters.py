"""Each exporter pass on a tiny graph: FP export names, weight/activation Q/DQ lowering,
shared-tensor Q/DQ, the k-bit Clip, FP32-weight codes, and FP ladder step 1."""

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from diffquant.engines import OrtEngine
from diffquant.errors import DiffquantError
from diffquant.exporters import fp_onnx_proto, lint, lower_plan
from diffquant.quant import LayerPlan, PerAxis, QuantFormat, QuantPlan
from diffquant.quant.fake import quantize_int, scale_from_amax


class Tiny(nn.Module):
    """conv -> two linears reading the same tensor (like Q/K) -> add."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)


class Wrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Tiny()

    def forward(self, x):
        h = self.model.conv(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        return self.model.q(h) + self.model.k(h)


def _export(float_dtype=torch.float32):
    m = Wrap().eval().to(float_dtype)
    buf = io.BytesIO()
    x = torch.randn(1, 2, 4, 4, dtype=float_dtype)
    torch.onnx.export(
        m,
        (x,),
        buf,
        dynamo=False,
        opset_version=21,
        input_names=["sample"],
        output_names=["noise_pred"],
        do_constant_folding=False,
    )
    return m, onnx.load_from_string(buf.getvalue())


def _plan(m: Wrap, wbits=8, abits=8, scales=None) -> QuantPlan:
    plan = QuantPlan(model="tiny", model_digest="x", request=f"w{wbits}a{abits}", state="frozen")
    wf = QuantFormat(bits=wbits, granularity=PerAxis(0))
    af = QuantFormat(bits=abits)
    for name, op in [("conv", "conv"), ("q", "linear"), ("k", "linear")]:
        w = getattr(m.model, name).weight.detach().float()
        lp = plan.layers[name] = LayerPlan.new(name, op, "test", wf, af)
        lp.weight_site.scale = scale_from_amax(w.reshape(len(w), -1).abs().amax(1), wf)
        lp.sites["input"].scale = torch.tensor([(scales or {}).get(name, 0.05)])
        lp.sites["input"].group = "q:input" if name != "conv" else ""
    return plan


def _nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def test_fp_export_keeps_layer_names():
    _, proto = _export()
    inits = {i.name for i in proto.graph.initializer}
    assert {"model.conv.weight", "model.q.weight", "model.k.weight"} <= inits
    # Linear exports as Transpose(W) -> MatMul
    t = [n for n in _nodes(proto, "Transpose") if n.input[0] == "model.q.weight"]
    assert len(t) == 1


def test_lowering_weights_and_activations():
    m, proto = _export()
    plan = _plan(m, wbits=4, abits=8)
    res = lower_plan(proto, plan)
    g = res.model
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    # INT8 containers holding 4-bit grids, per-channel scales on the output axis
    for name in ("conv", "q", "k"):
        q = inits[f"{name}.weight_quantized"]
        assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    dq_axes = {
        n.input[0]: n.attribute[0].i for n in _nodes(g, "DequantizeLinear") if n.input[0].endswith("weight_quantized")
    }
    assert dq_axes == {"conv.weight_quantized": 0, "q.weight_quantized": 1, "k.weight_quantized": 1}
    assert inits["q.weight_quantized"].shape == (4, 4)  # stored as W^T [K, N]
    want = quantize_int(m.model.q.weight.detach(), plan.weight_scale("q"), plan.layers["q"].weight).numpy().T
    assert np.array_equal(inits["q.weight_quantized"], want.astype(np.int8))
    # q and k read one tensor: one Q/DQ for both
    qs = _nodes(g, "QuantizeLinear")
    assert len(qs) == 2
    assert len(res.act_dq) == 2 and sorted(res.act_dq["q.act_dq"]["layers"]) == ["k", "q"]
    # no Transpose of a quantized weight is left
    assert not [n for n in _nodes(g, "Transpose") if n.input[0].endswith(".weight")]
    assert lint(g).ok
    # zero points are int8 zeros; scales have the graph's float dtype
    for n in qs:
        assert inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0
        assert inits[n.input[1]].dtype == np.float32


def test_low_bit_activations_get_a_clip():
    m, proto = _export()
    res = lower_plan(proto, _plan(m, wbits=8, abits=6))
    clips = _nodes(res.model, "Clip")
    assert len(clips) == 2
    inits = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    lo, hi = inits[clips[0].input[1]], inits[clips[0].input[2]]
    assert np.isclose(lo, -32 * 0.05) and np.isclose(hi, 31 * 0.05)


def test_lowering_fp16_graph_uses_fp16_scales_and_fp32_weights():
    m16, proto16 = _export(torch.float16)
    m32 = Wrap().eval()
    plan = _plan(m32)
    res = lower_plan(proto16, plan, weights={f"{k}": v for k, v in m32.model.state_dict().items()})
    inits = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    assert inits["conv.weight_scale"].dtype == np.float16 and inits["conv.act_scale"].dtype == np.float16
    want = quantize_int(m32.model.conv.weight.detach(), plan.weight_scale("conv"), plan.layers["conv"].weight).numpy()
    assert np.array_equal(inits["conv.weight_quantized"], want.astype(np.int8))
    assert lint(res.model).ok
    out = OrtEngine(res.model).run({"sample": np.random.rand(1, 2, 4, 4).astype(np.float16)})
    assert out["noise_pred"].dtype == np.float16


def test_shared_tensor_with_different_scales_is_refused():
    m, proto = _export()
    plan = _plan(m, scales={"q": 0.05, "k": 0.07})
    with pytest.raises(DiffquantError, match="one Q/DQ per tensor"):
        lower_plan(proto, plan)


def test_unfrozen_plan_is_refused():
    m, proto = _export()
    plan = _plan(m)
    plan.state = "calibrating"
    with pytest.raises(DiffquantError, match="frozen"):
        lower_plan(proto, plan)


def test_fp_ladder_step1(tiny_unet, tiny_dit):
    for d in (tiny_unet, tiny_dit):
        proto = fp_onnx_proto(d, "float32")
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
        inp = d.example_inputs(3)
        with torch.no_grad():
            ref = d(**inp).numpy()
        got = OrtEngine(proto).run(inp.numpy())["noise_pred"]
        assert got.shape == ref.shape  # batch 3 through a graph exported at batch 2: dynamic batch
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
