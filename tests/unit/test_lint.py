"""The TensorRT rules linter rejects each violation on a hand-built graph, naming the node."""

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from diffquant.exporters import lint

F16 = T.FLOAT16


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _graph(nodes, inits, inputs, outputs, opset=21):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def conv_graph(
    *,
    act_scale=0.1,
    act_zp=0,
    w_axis=0,
    w_scale=None,
    zp_dtype=np.int8,
    scale_dtype=np.float16,
    cast=False,
    consumer="Conv",
):
    """x -> Q -> DQ -> Conv(W via DQ) -> y: the well-formed case with knobs to break it."""
    w_scale = np.full(4, 0.01) if w_scale is None else w_scale
    inits = [
        _init("s", np.array(act_scale, scale_dtype)),
        _init("z", np.array(act_zp, zp_dtype)),
        _init("wq", np.ones((4, 2, 3, 3), np.int8)),
        _init("ws", np.asarray(w_scale, np.float16)),
        _init("wz", np.zeros(len(w_scale), np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="act_Q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="act_DQ"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="w_DQ", axis=w_axis),
    ]
    src = "xd"
    if cast:
        nodes.append(helper.make_node("Cast", ["xd"], ["xc"], name="the_cast", to=F16))
        src = "xc"
    if consumer == "Conv":
        nodes.append(helper.make_node("Conv", [src, "wd"], ["y"], name="conv"))
    else:
        nodes.append(helper.make_node(consumer, [src], ["y"], name="relu"))
    x = helper.make_tensor_value_info("x", F16, [1, 2, 8, 8])
    y = helper.make_tensor_value_info("y", F16, None)
    return _graph(nodes, inits, [x], [y])


def test_clean_graph_passes():
    rep = lint(conv_graph())
    assert rep.ok, rep.violations
    assert (rep.n_q, rep.n_dq) == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "rule", "node"),
    [
        ({"act_zp": 3}, "zero-point", "act_Q"),
        ({"act_scale": -0.1}, "scale-positive", "act_Q"),
        ({"act_scale": 1e-9}, "scale-positive", "act_Q"),  # underflows to 0 in FP16
        ({"scale_dtype": np.float32}, "scale-dtype", "act_Q"),
        ({"zp_dtype": np.uint8}, "q-type", "act_Q"),
        ({"w_axis": 1, "w_scale": np.full(4, 0.01)}, "per-channel-weights", "w_DQ"),
        ({"cast": True}, "cast-after-dq", "the_cast"),
    ],
)
def test_each_violation_is_named(kwargs, rule, node):
    rep = lint(conv_graph(**kwargs))
    hits = [v for v in rep.violations if v.rule == rule]
    assert hits, rep.violations
    assert hits[0].node == node


def test_per_tensor_activations():
    m = conv_graph()
    for i in m.graph.initializer:
        if i.name == "s":
            i.CopyFrom(_init("s", np.full(2, 0.1, np.float16)))
    assert "per-tensor-activations" in lint(m).rules()


def test_qdq_placement_outside_conv_matmul():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
        helper.make_node("Relu", ["xd"], ["y"], name="relu"),
    ]
    m = _graph(
        nodes,
        [_init("s", np.array(0.1, np.float16)), _init("z", np.array(0, np.int8))],
        [helper.make_tensor_value_info("x", F16, [4])],
        [helper.make_tensor_value_info("y", F16, None)],
    )
    v = [v for v in lint(m).violations if v.rule == "qdq-placement"]
    assert v and v[0].node == "dq"


def _attention(*, quantize_scores: bool):
    """q, k activations -> MatMul (Q.K): with Q/DQ on its inputs when asked."""
    inits = [_init("s", np.array(0.1, np.float16)), _init("z", np.array(0, np.int8))]
    nodes = []
    a, b = "q", "k"
    if quantize_scores:
        nodes += [
            helper.make_node("QuantizeLinear", ["q", "s", "z"], ["qq"], name="q_Q"),
            helper.make_node("DequantizeLinear", ["qq", "s", "z"], ["qd"], name="q_DQ"),
        ]
        a = "qd"
    nodes.append(helper.make_node("MatMul", [a, b], ["y"], name="attn_qk"))
    ins = [helper.make_tensor_value_info(n, F16, [2, 4, 4]) for n in ("q", "k")]
    return _graph(nodes, inits, ins, [helper.make_tensor_value_info("y", F16, None)])


def test_no_qdq_on_attention_matmul():
    assert lint(_attention(quantize_scores=False)).ok
    v = [v for v in lint(_attention(quantize_scores=True)).violations if v.rule == "attention-matmul"]
    assert v and v[0].node == "attn_qk"


def test_shared_tensor_needs_one_q():
    inits = [
        _init("s", np.array(0.1, np.float16)),
        _init("z", np.array(0, np.int8)),
        _init("w", np.ones((4, 4), np.float16)),
    ]
    nodes = []
    for i in range(2):
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], [f"xq{i}"], name=f"Q{i}"),
            helper.make_node("DequantizeLinear", [f"xq{i}", "s", "z"], [f"xd{i}"], name=f"DQ{i}"),
            helper.make_node("MatMul", [f"xd{i}", "w"], [f"y{i}"], name=f"mm{i}"),
        ]
    m = _graph(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", F16, [2, 4])],
        [helper.make_tensor_value_info(f"y{i}", F16, None) for i in range(2)],
    )
    v = [v for v in lint(m).violations if v.rule == "shared-tensor"]
    assert v and v[0].node == "Q1"


def _int4_weight(consumer="MatMul", block=64, opset=21):
    k, n = 128, 8
    wshape = (k, n) if consumer == "MatMul" else (n, 2, 8, 8)
    sshape = (k // block, n) if consumer == "MatMul" else (n // 1, 2, 8 // 8 if block else 1, 8)
    w = numpy_helper.from_array(np.zeros(wshape, np.int8), "w4")
    w.data_type = T.INT4  # retype the initializer (values 0)
    w.ClearField("raw_data")
    w.int32_data.extend([0] * int(np.prod(wshape) // 2 + np.prod(wshape) % 2))
    inits = [w, _init("ws", np.full(sshape, 0.01, np.float16))]
    attrs = {"axis": 0, "block_size": block} if block else {}
    nodes = [helper.make_node("DequantizeLinear", ["w4", "ws"], ["wd"], name="w4_DQ", **attrs)]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"))
        x = helper.make_tensor_value_info("x", F16, [2, k])
    else:
        nodes.append(helper.make_node("Conv", ["x", "wd"], ["y"], name="conv4"))
        x = helper.make_tensor_value_info("x", F16, [1, 2, 8, 8])
    return _graph(nodes, inits, [x], [helper.make_tensor_value_info("y", F16, None)], opset=opset)


def test_int4_rules():
    assert "int4-weight-only" not in lint(_int4_weight()).rules()
    assert "int4-weight-only" in lint(_int4_weight(consumer="Conv")).rules()
    assert "int4-weight-only" in lint(_int4_weight(block=32)).rules()
    assert "opset" in lint(_int4_weight(opset=19)).rules()
