"""Lowering a QuantPlan into Q/DQ nodes on the FP ONNX graph, for a target profile.

See docs/ARCHITECTURE.md (targets and backends): weights become INT8 initializers (values on the plan's n-bit grid) behind a
per-output-channel DequantizeLinear, or INT4 initializers with a blocked DequantizeLinear for
block formats on MatMul (weight-only); each quantized layer's input gets one per-tensor
QuantizeLinear/DequantizeLinear pair, shared by every quantized reader of that tensor; grids
under 8 bits add a Clip to the k-bit range before Q. Scales have the graph's float dtype.
Equivalent scaling (an input site's multiplier) and power-of-two scaling (its PTS exponents) make
one per-channel multiplier before the shared Q: folded into the producer where that is exact
(a LayerNormalization's scale and bias, or a constant Mul -> Add affine such as a GroupNorm's,
whose output only the layers of this input group read), else one Mul. PTS weights are the
n-bit codes shifted left by (K - k) per input channel with weight scale s_w / 2^K, inside INT8.
A shortcut-split conv becomes two convs (one per concat input, each behind its own Q/DQ) + Add.

``tensorrt``: FP16 graph, INT8 activations with zero point 0.
``onnxruntime``: FP32 graph, UINT8 activations with zero point 128 (the symmetric INT8 grid
shifted: ORT's x86 kernels want U8 activations), INT8 weights with zero point 0, and a Q/DQ on
every quantized conv's output (the plan's 8-bit output scale) so ONNX Runtime fuses
DQ -> Conv -> Q into QLinearConv; DQ -> MatMul fuses into MatMulIntegerToFloat and blocked INT4
DQ -> MatMul into MatMulNBits without an output Q. U8S8 kernels are the fast ones, and exact
wherever weight codes stay within +-64 or the CPU has VNNI; `diffquant build` checks the CPU
that will run the engine and rewrites full-range weights to U8 (exact, slower) where it lacks
VNNI (see `diffquant.engines.cpu`); `reduce_range` gives 7-bit weight grids instead.
Graph edits use onnx-graphsurgeon; the result is a new ModelProto.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import numpy_helper

from diffquant.errors import DiffquantError
from diffquant.exporters.onnx_fp import MODULE_PREFIX
from diffquant.quant.fake import MIN_SCALE, quantize_int
from diffquant.quant.format import PerAxis, PerBlock, QuantFormat
from diffquant.quant.plan import OUT_FORMAT, LayerPlan, QuantPlan

__all__ = ["TARGETS", "LoweringResult", "TargetProfile", "code_range", "graph_float_dtype", "lower_plan"]

NP_FLOAT = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class TargetProfile:
    """How a target wants the plan's decisions written: graph float type, activation and weight
    integer types and zero points (each pair encodes the same symmetric grid), and whether conv
    outputs are requantized."""

    name: str
    float_dtype: str
    act_dtype: type
    act_zero_point: int
    weight_dtype: type
    weight_zero_point: int
    requantize_conv_outputs: bool


TARGETS = {
    "tensorrt": TargetProfile("tensorrt", "float16", np.int8, 0, np.int8, 0, False),
    "onnxruntime": TargetProfile("onnxruntime", "float32", np.uint8, 128, np.int8, 0, True),
}


@dataclass
class LoweringResult:
    """The Q/DQ graph plus what was realized per layer, and for parity every activation DQ
    output with the tensor its Q reads (``input``) and the layers that read it (``layers``)."""

    model: onnx.ModelProto
    realized: dict[str, dict] = field(default_factory=dict)
    act_dq: dict[str, dict] = field(default_factory=dict)
    weight_grids: dict[str, dict] = field(default_factory=dict)


def graph_float_dtype(model: onnx.ModelProto) -> type:
    """The float dtype of the graph's first float input (the latent)."""
    for inp in model.graph.input:
        et = inp.type.tensor_type.elem_type
        if et in NP_FLOAT:
            return NP_FLOAT[et]
    raise DiffquantError("the graph has no float input; is it a denoiser export?")


def _find_weight_consumer(graph: gs.Graph, weight_name: str, layer: str) -> tuple[gs.Node, str]:
    """The Conv / MatMul / Gemm reading ``weight_name`` (through a Transpose for Linear)."""
    tensors = graph.tensors()
    if weight_name not in tensors:
        raise DiffquantError(
            f"layer {layer}: weight {weight_name!r} is not in the exported graph (was it exported with constant folding?)"
        )
    for node in tensors[weight_name].outputs:
        if node.op in ("Conv", "Gemm"):
            return node, "direct"
        if node.op == "Transpose" and len(node.outputs[0].outputs) == 1 and node.outputs[0].outputs[0].op == "MatMul":
            return node.outputs[0].outputs[0], "transposed"
    raise DiffquantError(f"layer {layer}: no Conv/MatMul/Gemm reads {weight_name!r} in the exported graph")


def code_range(fmt: QuantFormat) -> tuple[int, int]:
    """The lowest and highest integer code of a format (over all channels of a mixed one)."""
    lo, hi = fmt.qmin, fmt.qmax
    return (int(lo.min()), int(hi.max())) if fmt.mixed else (lo, hi)


def _weight_dq(
    lp: LayerPlan,
    w: torch.Tensor,
    scale: torch.Tensor,
    node: gs.Node,
    how: str,
    fdtype,
    prof: TargetProfile,
    pts: torch.Tensor | None = None,
) -> tuple[gs.Variable, dict]:
    fmt: QuantFormat = lp.weight
    q = quantize_int(w.float(), scale.float(), fmt)
    name = lp.name
    shift, big = "", 0
    if pts is not None:  # power-of-two scaling: codes * 2^(K - k) per input channel, scale s_w / 2^K
        big = int(pts.max())
        lo, hi = code_range(fmt)
        if not isinstance(fmt.granularity, PerAxis) or lo * 2**big < -128 or hi * 2**big > 127:
            raise DiffquantError(
                f"layer {name}: power-of-two exponents up to {big} do not fit {fmt.bits}-bit weight codes inside INT8"
            )
        q = q * torch.exp2(big - pts).reshape([1, -1] + [1] * (q.dim() - 2))
        scale = scale.float() / 2**big
        if float(scale.min()) < MIN_SCALE:
            raise DiffquantError(f"layer {name}: weight scale / 2^{big} underflows FP16; re-run the pts pass")
        shift = f", codes shifted left by {big} - k per input channel (power-of-two scaling)"
    q = q.to(torch.int8)
    if isinstance(fmt.granularity, PerBlock):
        if how != "transposed" or fmt.max_bits > 4 or lp.act is not None:
            raise DiffquantError(
                f"layer {name}: block formats lower only to INT4 weight-only MatMul weights (bits like w4g64a16); "
                f"got {fmt.bits}-bit blocks on a {node.op}{' with quantized activations' if lp.act else ''}"
            )
        qk = q.t().contiguous().numpy()  # [K, N], blocks along K (axis 0); typed INT4 after export
        wq = gs.Constant(f"{name}.weight_quantized", qk)
        ws = gs.Constant(f"{name}.weight_scale", scale.t().contiguous().numpy().astype(fdtype))
        out = gs.Variable(f"{name}.weight_dq", dtype=fdtype)
        attrs = {"axis": 0, "block_size": fmt.granularity.size}
        dq = gs.Node("DequantizeLinear", f"{name}.weight_DequantizeLinear", attrs, [wq, ws], [out])
        return out, {"node": dq, "axis": 0, "desc": f"INT4 blocks of {fmt.granularity.size} along K", "int4": wq.name}
    if how == "transposed":  # Linear as MatMul(x, W^T): weight [K, N], output channels on axis 1
        q, axis = q.t().contiguous(), 1
    elif node.op == "Gemm":
        axis = 0 if node.attrs.get("transB", 0) else 1
    else:
        axis = 0
    wdt, zp = np.dtype(prof.weight_dtype), prof.weight_zero_point
    wq = gs.Constant(f"{name}.weight_quantized", (q.numpy().astype(np.int16) + zp).astype(wdt))
    ws = gs.Constant(f"{name}.weight_scale", scale.numpy().astype(fdtype))
    wz = gs.Constant(f"{name}.weight_zero_point", np.full(scale.shape, zp, wdt))
    out = gs.Variable(f"{name}.weight_dq", dtype=fdtype)
    dq = gs.Node("DequantizeLinear", f"{name}.weight_DequantizeLinear", {"axis": axis}, [wq, ws, wz], [out])
    grid = (
        f" (per-channel {min(fmt.bits)}..{max(fmt.bits)}-bit grids)"
        if fmt.mixed
        else ""
        if fmt.bits == 8
        else f" ({fmt.bits}-bit grid)"
    )
    bits = "".join(map(str, fmt.bits)) if fmt.mixed else fmt.bits
    declared = {"axis": axis, "bits": bits, "shift": big, "zero_point": zp}
    return out, {
        "node": dq,
        "axis": axis,
        "desc": f"{wdt.name.upper()}{grid} per-channel axis {axis}{shift}",
        "grid": (wq.name, declared),
    }


def lower_plan(
    fp_model: onnx.ModelProto,
    plan: QuantPlan,
    target: str = "tensorrt",
    weights: dict[str, torch.Tensor] | None = None,
    group: int = 0,
) -> LoweringResult:
    """Insert the plan's Q/DQ into a copy of ``fp_model`` for ``target``, with the activation
    scales of timestep ``group``.

    ``weights`` (layer weight name -> FP32 tensor, e.g. the model's state dict) gives the exact
    weights the plan was calibrated on; without it the graph's initializers are used, which in
    an FP16 graph are already rounded and can land one step off the fake-quant codes.
    """
    if target not in TARGETS:
        raise DiffquantError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    prof = TARGETS[target]
    if plan.state not in ("frozen", "exported"):
        raise DiffquantError(
            f"plan for {plan.model} is {plan.state!r}: export needs a frozen plan (finish `diffquant quantize`)"
        )
    if not 0 <= group < plan.n_groups:
        raise DiffquantError(f"timestep group {group} does not exist; the plan has {plan.n_groups}")
    research = [str(s.key) for lp in plan.quantized_layers() for s in lp.sites.values() if s.format.research_only]
    if research:
        raise DiffquantError(
            f"site {research[0]} has a {plan.sites[research[0]].format.kind} grid, which is research only (no Q/DQ form): evaluate it in fake-quant, or re-quantize with a uniform recipe"
        )
    fdtype = graph_float_dtype(fp_model)
    graph = gs.import_onnx(fp_model)
    tensors = graph.tensors()
    result = LoweringResult(model=fp_model)
    act_q: dict[str, tuple] = {}  # input tensor name -> (dq out, scale, first layer, multiplier bytes, where it went)
    int4: set[str] = set()
    # graph node of each activation-quantized layer -> its input multiplier's bytes (folding
    # into a producer is exact only when every reader of its output takes the same multiplier)
    readers = {}
    for lp in plan.quantized_layers():
        if lp.act and not lp.split:
            mult = plan.act_multiplier(lp.name, group)
            readers[_find_weight_consumer(graph, f"{MODULE_PREFIX}{lp.name}.weight", lp.name)[0].name] = (
                None if mult is None else _bytes(mult)
            )
    for lp in plan.quantized_layers():
        weight_name = f"{MODULE_PREFIX}{lp.name}.weight"
        node, how = _find_weight_consumer(graph, weight_name, lp.name)
        info: dict = {"node": node.name, "op": node.op}
        if lp.split and lp.act:
            if node.op != "Conv" or not lp.weight:
                raise DiffquantError(f"layer {lp.name}: a shortcut split lowers only on a conv with quantized weights")
            add = _split_conv(
                graph,
                node,
                lp,
                _plan_weight(lp, plan, weights, tensors[weight_name]),
                plan,
                group,
                act_q,
                result,
                prof,
                fdtype,
                info,
            )
            if prof.requantize_conv_outputs:  # after the Add: the same output rounding as fake-quant (not fused)
                info["output"] = _requantize_output(
                    graph, add, lp, plan.out_scale(lp.name, group), prof, fdtype, result
                )
            result.realized[lp.name] = info
            continue
        if lp.weight:
            w = _plan_weight(lp, plan, weights, tensors[weight_name])
            dq_out, wi = _weight_dq(
                lp, w, plan.weight_scale(lp.name), node, how, fdtype, prof, plan.pts_exponents(lp.name, group)
            )
            graph.nodes.append(wi["node"])
            node.inputs[1] = dq_out
            if "int4" in wi:
                int4.add(wi["int4"])
            if "grid" in wi:
                result.weight_grids[wi["grid"][0]] = wi["grid"][1]
            info["weight"] = wi["desc"]
        else:
            info["weight"] = "FP"
        if lp.act:
            x = node.inputs[0]
            mult = plan.act_multiplier(lp.name, group)
            node.inputs[0] = _shared_qdq(
                graph,
                x,
                lp,
                float(plan.act_scale(lp.name, group)),
                mult,
                node.op,
                act_q,
                result,
                prof,
                fdtype,
                readers=readers,
            )
            clip = "" if lp.act.bits == 8 else f", Clip to {lp.act.bits}-bit range"
            info["act"] = f"{np.dtype(prof.act_dtype).name.upper()} per-tensor{clip}"
            if mult is not None:
                info["act_multiplier"] = act_q[x.name][4]
        else:
            info["act"] = "FP"
        if prof.requantize_conv_outputs and node.op == "Conv" and lp.act:
            info["output"] = _requantize_output(graph, node, lp, plan.out_scale(lp.name, group), prof, fdtype, result)
        result.realized[lp.name] = info
    for site in plan.operands.values():  # DAQ's attention probabilities: no Q/DQ in either target's graph
        result.realized[str(site.key)] = {
            "op": "Softmax -> P.V",
            "weight": "-",
            "act": f"P: {site.format.kind} {site.format.max_bits}-bit in the research form only; deployed in floating point",
        }
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    for init in model.graph.initializer:  # onnx-graphsurgeon writes int8 bytes; pack the INT4 ones
        if init.name in int4:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(ml_dtypes.int4), init.name))
    model.ir_version = fp_model.ir_version
    del model.opset_import[:]
    model.opset_import.extend(fp_model.opset_import)
    meta = {p.key: p.value for p in fp_model.metadata_props}
    meta.update(
        {
            "diffquant.target": target,
            "diffquant.bits": plan.request,
            "diffquant.recipe": str(plan.recipe.get("name", "")),
            "diffquant.plan_model_digest": plan.model_digest,
            "diffquant.timestep_group": str(group),
            "diffquant.timestep_range": json.dumps(plan.timestep_groups[group] if plan.timestep_groups else []),
            "diffquant.act_dq": json.dumps(result.act_dq),
            "diffquant.realized": json.dumps(result.realized),
            "diffquant.weight_grids": json.dumps(result.weight_grids),
        }
    )
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    result.model = model
    return result


def _bytes(v) -> bytes:
    return np.asarray(v, dtype=np.float32).tobytes()


def _shared_qdq(
    graph,
    x: gs.Variable,
    lp: LayerPlan,
    scale: float,
    mult,
    op: str,
    act_q: dict,
    result: LoweringResult,
    prof: TargetProfile,
    fdtype,
    kind: str = "act",
    readers: dict | None = None,
) -> gs.Variable:
    """The activation Q/DQ of tensor ``x`` for layer ``lp``: reused when another quantized layer
    already reads ``x`` (it must have the same scale and multiplier: one Q/DQ per tensor), else
    ``[per-channel multiplier ->] [Clip ->] Q -> DQ``, the multiplier folded into the producer
    of ``x`` where exact (see `_fold_multiplier`), else a Mul."""
    key = None if mult is None else _bytes(mult)
    if x.name in act_q:
        dq_out, prev, first, prev_key, _ = act_q[x.name]
        if prev != scale or prev_key != key:
            what = "activation scales" if prev != scale else "input multipliers (smoothing / power-of-two)"
            raise DiffquantError(
                f"layers {first} and {lp.name} read the same tensor {x.name!r} with different {what} "
                f"({prev:g} vs {scale:g}); TensorRT needs one Q/DQ per tensor: give them one input group"
            )
        result.act_dq[dq_out.name]["layers"].append(lp.name)
        return dq_out
    base = f"{lp.input_group or lp.name}" if kind == "act" else f"{lp.name}.{kind}"
    src, where = x, ""
    if mult is not None:
        channels_last = op != "Conv"
        where = _fold_multiplier(x, np.asarray(mult, dtype=np.float32), channels_last, key, readers or {}, fdtype, base)
        if not where:
            shape = [-1] + ([] if channels_last else [1, 1])
            m = gs.Constant(f"{base}.act_smooth", np.asarray(mult, dtype=np.float32).reshape(shape).astype(fdtype))
            src = gs.Variable(f"{base}.act_smoothed", dtype=fdtype)
            graph.nodes.append(gs.Node("Mul", f"{base}.act_smooth_Mul", inputs=[x, m], outputs=[src]))
            where = f"one Mul before Q ({base}.act_smooth_Mul)"
    dq_out = _qdq(graph, src, base, "act", scale, lp.act, prof, fdtype)
    act_q[x.name] = (dq_out, scale, lp.name, key, where)
    result.act_dq[dq_out.name] = {"input": src.name, "layers": [lp.name], "scale": scale, "bits": lp.act.bits}
    return dq_out


def _const_values(t) -> np.ndarray | None:
    """The values of a constant tensor: an initializer or Constant node, or one behind the
    Identity / Unsqueeze / Reshape nodes the TorchScript exporter writes around parameters (constant folding is off),
    else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values, dtype=np.float32)
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return np.asarray(node.attrs["value"].values, dtype=np.float32)
    if node.op not in ("Identity", "Unsqueeze", "Reshape"):
        return None
    vals = [_const_values(i) for i in node.inputs]
    if not vals or any(v is None for v in vals):
        return None
    if node.op == "Identity":
        return vals[0]
    if node.op == "Unsqueeze" and len(vals) == 2:
        out = vals[0]
        for ax in sorted(int(a) % (out.ndim + len(vals[1])) for a in vals[1].reshape(-1)):
            out = np.expand_dims(out, ax)
        return out
    if node.op == "Reshape" and len(vals) == 2:
        return vals[0].reshape([int(d) for d in vals[1].reshape(-1)])
    return None


def _fold_multiplier(
    x: gs.Variable, mult: np.ndarray, channels_last: bool, key: bytes, readers: dict, fdtype, base: str
) -> str:
    """Fold the per-channel multiplier into the node producing ``x``, if exact: every reader of
    ``x`` is a quantized layer taking this very multiplier (or a Shape), and the producer is a
    LayerNormalization over the channel axis with constant scale (and bias), or a ``Mul`` by a
    per-channel constant whose output only feeds an ``Add`` of a per-channel constant (a
    GroupNorm's or LayerNorm's affine). Returns where it went, or "" if it was not folded."""
    if not x.inputs or any(c.op != "Shape" and readers.get(c.name, b"") != key for c in x.outputs):
        return ""
    prod, c = x.inputs[0], len(mult)
    shape = [c] if channels_last else [c, 1, 1]

    def scaled(t) -> np.ndarray | None:
        v = _const_values(t)
        if v is None:
            return None
        try:
            out = v * mult.reshape(shape)
        except ValueError:
            return None
        return out if out.size == c else None

    if prod.op == "LayerNormalization" and channels_last and prod.attrs.get("axis", -1) == -1:
        new = [scaled(t) for t in prod.inputs[1:3]]
        if all(v is not None for v in new):
            for i, v in enumerate(new, start=1):
                prod.inputs[i] = gs.Constant(f"{base}.folded_{'scale' if i == 1 else 'bias'}", v.astype(fdtype))
            return f"folded into {prod.name} (LayerNormalization scale and bias)"
        return ""
    if prod.op == "Add" and len(prod.inputs) == 2:
        ci = next((i for i, t in enumerate(prod.inputs) if _const_values(t) is not None), None)
        mul_in = prod.inputs[1 - ci] if ci is not None else None
        mul = mul_in.inputs[0] if mul_in is not None and mul_in.inputs else None
        if mul is None or mul.op != "Mul" or len(mul_in.outputs) != 1:
            return ""
        mi = next((i for i, t in enumerate(mul.inputs) if _const_values(t) is not None), None)
        beta, gamma = scaled(prod.inputs[ci]), scaled(mul.inputs[mi]) if mi is not None else None
        if beta is None or gamma is None:
            return ""
        prod.inputs[ci] = gs.Constant(f"{base}.folded_bias", beta.astype(fdtype))
        mul.inputs[mi] = gs.Constant(f"{base}.folded_scale", gamma.astype(fdtype))
        return f"folded into {mul.name} -> {prod.name} (per-channel affine)"
    return ""


def _plan_weight(lp: LayerPlan, plan: QuantPlan, weights, init) -> torch.Tensor:
    w = plan.weights.get(lp.name)
    if w is None and weights is not None and f"{lp.name}.weight" in weights:
        w = weights[f"{lp.name}.weight"]
    if w is None:
        w = torch.from_numpy(np.asarray(init.values).astype(np.float32))
    return w


def _split_conv(
    graph,
    node: gs.Node,
    lp: LayerPlan,
    w: torch.Tensor,
    plan: QuantPlan,
    group: int,
    act_q: dict,
    result: LoweringResult,
    prof: TargetProfile,
    fdtype,
    info: dict,
) -> gs.Node:
    """Shortcut split, lowered exactly: conv([h, skip], W) = conv(h, W[:, :c]) + conv(skip, W[:, c:]).
    Each half conv reads its own DQ (a Q/DQ on each concat input, the skip one shared with the
    other quantized reader of that tensor) and INT8 weights on the same per-channel scales, so
    both stay DQ -> Conv patterns that TensorRT fuses; a DQ feeding a Concat would not (the
    linter's qdq-placement rule), and the original Concat keeps feeding the FP GroupNorm path."""
    cat = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if cat is None or cat.op != "Concat" or len(cat.inputs) != 2 or cat.attrs.get("axis") not in (1, -3):
        raise DiffquantError(
            f"layer {lp.name}: the plan splits its input, but the graph does not feed it a two-input channel Concat"
        )
    c, scale = lp.split, plan.weight_scale(lp.name)
    half1 = LayerPlan.new(f"{lp.name}.half1", lp.op, lp.rule, lp.weight, lp.act)
    w0, wi = _weight_dq(lp, w[:, :c], scale, node, "direct", fdtype, prof)
    w1, wi1 = _weight_dq(half1, w[:, c:], scale, node, "direct", fdtype, prof)
    graph.nodes += [wi["node"], wi1["node"]]
    result.weight_grids.update(dict([wi["grid"], wi1["grid"]]))
    dqs = [
        _shared_qdq(
            graph,
            piece,
            LayerPlan.new(lp.name, lp.op, lp.rule, None, lp.act),
            float(plan.act_scale(lp.name, group, half)),
            None,
            "Conv",
            act_q,
            result,
            prof,
            fdtype,
            kind=f"act{half}",
        )
        for half, piece in enumerate(cat.inputs)
    ]
    y = node.outputs[0]
    part0, part1 = gs.Variable(f"{lp.name}.part0", dtype=fdtype), gs.Variable(f"{lp.name}.part1", dtype=fdtype)
    node.inputs[0], node.inputs[1] = dqs[0], w0
    node.outputs = [part0]
    graph.nodes.append(gs.Node("Conv", f"{lp.name}.half1_Conv", dict(node.attrs), [dqs[1], w1], [part1]))
    add = gs.Node("Add", f"{lp.name}.split_Add", inputs=[part0, part1], outputs=[y])
    graph.nodes.append(add)
    clip = "" if lp.act.bits == 8 else f", Clip to {lp.act.bits}-bit range"
    info["weight"] = f"{wi['desc']}, split in two convs at input channel {c}"
    info["act"] = (
        f"{np.dtype(prof.act_dtype).name.upper()} per-tensor{clip}, one Q/DQ per concat input (shortcut split: two convs + Add)"
    )
    return add


def _requantize_output(
    graph: gs.Graph,
    node: gs.Node,
    lp: LayerPlan,
    scale: float | None,
    prof: TargetProfile,
    fdtype,
    result: LoweringResult,
) -> str:
    """Put a Q/DQ on a conv's output so ONNX Runtime fuses QLinearConv; without a recorded
    output scale the conv stays unfused (correct, but slower on CPU)."""
    if scale is None:
        return "not requantized (plan has no output scale): runs as DQ -> Conv, unfused"
    y = node.outputs[0]
    raw = gs.Variable(f"{lp.name}.out_raw", dtype=fdtype)
    node.outputs = [raw]
    dq_out = _qdq(graph, raw, lp.name, "out", scale, OUT_FORMAT, prof, fdtype, out=y)
    result.act_dq[dq_out.name] = {"input": raw.name, "layers": [lp.name], "scale": scale, "bits": 8, "kind": "output"}
    return f"{np.dtype(prof.act_dtype).name.upper()} Q/DQ on the output (fuses to QLinearConv)"


def _qdq(
    graph: gs.Graph,
    x: gs.Variable,
    base: str,
    kind: str,
    scale: float,
    fmt: QuantFormat,
    prof: TargetProfile,
    fdtype,
    out: gs.Variable | None = None,
) -> gs.Variable:
    """Append ``[Clip ->] QuantizeLinear -> DequantizeLinear`` on ``x``; names ``<base>.<kind>_*``."""
    s = gs.Constant(f"{base}.{kind}_scale", np.array(scale, dtype=fdtype))
    z = gs.Constant(f"{base}.{kind}_zero_point", np.array(prof.act_zero_point, dtype=prof.act_dtype))
    src = x
    if fmt.bits < 8:
        lo = gs.Constant(f"{base}.{kind}_clip_min", np.array(fmt.qmin * scale, dtype=fdtype))
        hi = gs.Constant(f"{base}.{kind}_clip_max", np.array(fmt.qmax * scale, dtype=fdtype))
        src = gs.Variable(f"{base}.{kind}_clipped", dtype=fdtype)
        graph.nodes.append(gs.Node("Clip", f"{base}.{kind}_Clip", inputs=[x, lo, hi], outputs=[src]))
    q = gs.Variable(f"{base}.{kind}_quantized", dtype=prof.act_dtype)
    out = out if out is not None else gs.Variable(f"{base}.{kind}_dq", dtype=fdtype)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}.{kind}_QuantizeLinear", inputs=[src, s, z], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}.{kind}_DequantizeLinear", inputs=[q, s, z], outputs=[out]))
    return out
