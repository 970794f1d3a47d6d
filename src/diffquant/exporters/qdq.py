"""Lowering a QuantPlan into Q/DQ nodes on the FP ONNX graph, for the ``tensorrt`` target.

Per DESIGN.md: weights become INT8 initializers (values on the plan's n-bit grid) behind a
per-output-channel DequantizeLinear; each quantized layer's input gets one per-tensor symmetric
INT8 QuantizeLinear/DequantizeLinear pair, shared by every quantized reader of that tensor;
grids under 8 bits add a Clip to the k-bit range before Q. Scales have the graph's float dtype.
Graph edits use onnx-graphsurgeon; the result is a new ModelProto.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from diffquant.errors import DiffquantError
from diffquant.exporters.onnx_fp import MODULE_PREFIX
from diffquant.quant.fake import quantize_int
from diffquant.quant.format import QuantFormat
from diffquant.quant.plan import LayerPlan, QuantPlan

__all__ = ["LoweringResult", "lower_plan", "graph_float_dtype"]

NP_FLOAT = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass
class LoweringResult:
    """The Q/DQ graph plus what was realized per layer, and for parity every activation DQ
    output with the tensor its Q reads (``input``) and the layers that read it (``layers``)."""

    model: onnx.ModelProto
    realized: dict[str, dict] = field(default_factory=dict)
    act_dq: dict[str, dict] = field(default_factory=dict)


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
        raise DiffquantError(f"layer {layer}: weight {weight_name!r} is not in the exported graph (was it exported with constant folding?)")
    for node in tensors[weight_name].outputs:
        if node.op in ("Conv", "Gemm"):
            return node, "direct"
        if node.op == "Transpose" and len(node.outputs[0].outputs) == 1 and node.outputs[0].outputs[0].op == "MatMul":
            return node.outputs[0].outputs[0], "transposed"
    raise DiffquantError(f"layer {layer}: no Conv/MatMul/Gemm reads {weight_name!r} in the exported graph")


def _weight_dq(lp: LayerPlan, w: torch.Tensor, scale: torch.Tensor, node: gs.Node, how: str, fdtype) -> tuple[gs.Variable, dict]:
    fmt: QuantFormat = lp.weight
    q = quantize_int(w.float(), scale.float(), fmt).to(torch.int8)
    if how == "transposed":  # Linear as MatMul(x, W^T): weight [K, N], output channels on axis 1
        q, axis = q.t().contiguous(), 1
    elif node.op == "Gemm":
        axis = 0 if node.attrs.get("transB", 0) else 1
    else:
        axis = 0
    name = lp.name
    wq = gs.Constant(f"{name}.weight_quantized", q.numpy())
    ws = gs.Constant(f"{name}.weight_scale", scale.numpy().astype(fdtype))
    wz = gs.Constant(f"{name}.weight_zero_point", np.zeros(scale.shape, np.int8))
    out = gs.Variable(f"{name}.weight_dq", dtype=fdtype)
    dq = gs.Node("DequantizeLinear", f"{name}.weight_DequantizeLinear", {"axis": axis}, [wq, ws, wz], [out])
    return out, {"node": dq, "axis": axis}


def lower_plan(fp_model: onnx.ModelProto, plan: QuantPlan, target: str = "tensorrt", weights: dict[str, torch.Tensor] | None = None) -> LoweringResult:
    """Insert the plan's Q/DQ into a copy of ``fp_model`` for ``target``.

    ``weights`` (layer weight name -> FP32 tensor, e.g. the model's state dict) gives the exact
    weights the plan was calibrated on; without it the graph's initializers are used, which in
    an FP16 graph are already rounded and can land one step off the fake-quant codes.
    """
    if target != "tensorrt":
        raise DiffquantError(f"target {target!r} is not available yet; use --target tensorrt")
    if plan.state not in ("frozen", "exported"):
        raise DiffquantError(f"plan for {plan.model} is {plan.state!r}: export needs a frozen plan (finish `diffquant quantize`)")
    fdtype = graph_float_dtype(fp_model)
    graph = gs.import_onnx(fp_model)
    tensors = graph.tensors()
    result = LoweringResult(model=fp_model)
    act_q: dict[str, tuple[gs.Variable, float, str]] = {}  # input tensor name -> (dq out, scale, group)
    for lp in plan.quantized_layers():
        weight_name = f"{MODULE_PREFIX}{lp.name}.weight"
        node, how = _find_weight_consumer(graph, weight_name, lp.name)
        info: dict = {"node": node.name, "op": node.op}
        if lp.weight:
            w = plan.tensors.get(f"{lp.name}.weight")
            if w is None and weights is not None and f"{lp.name}.weight" in weights:
                w = weights[f"{lp.name}.weight"]
            if w is None:
                w = torch.from_numpy(np.asarray(tensors[weight_name].values).astype(np.float32))
            dq_out, wi = _weight_dq(lp, w, plan.weight_scale(lp.name), node, how, fdtype)
            graph.nodes.append(wi["node"])
            node.inputs[1] = dq_out
            grid = "" if lp.weight.bits == 8 else f" ({lp.weight.bits}-bit grid)"
            info["weight"] = f"INT8{grid} per-channel axis {wi['axis']}"
        else:
            info["weight"] = "FP"
        if lp.act:
            x = node.inputs[0]
            scale = float(plan.act_scale(lp.name))
            if x.name in act_q:
                dq_out, prev, group = act_q[x.name]
                if prev != scale:
                    raise DiffquantError(
                        f"layers {group} and {lp.name} read the same tensor {x.name!r} with different activation "
                        f"scales ({prev:g} vs {scale:g}); TensorRT needs one Q/DQ per tensor: give them one input group"
                    )
                result.act_dq[dq_out.name]["layers"].append(lp.name)
            else:
                dq_out = _act_qdq(graph, x, lp, scale, fdtype)
                act_q[x.name] = (dq_out, scale, lp.name)
                result.act_dq[dq_out.name] = {"input": x.name, "layers": [lp.name], "scale": scale, "bits": lp.act.bits}
            node.inputs[0] = dq_out
            clip = "" if lp.act.bits == 8 else f", Clip to {lp.act.bits}-bit range"
            info["act"] = f"INT8 per-tensor{clip}"
        else:
            info["act"] = "FP"
        result.realized[lp.name] = info
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = fp_model.ir_version
    del model.opset_import[:]
    model.opset_import.extend(fp_model.opset_import)
    meta = {p.key: p.value for p in fp_model.metadata_props}
    meta.update(
        {
            "diffquant.target": target,
            "diffquant.bits": plan.bits,
            "diffquant.recipe": str(plan.recipe.get("name", "")),
            "diffquant.plan_model_digest": plan.model_digest,
            "diffquant.act_dq": json.dumps(result.act_dq),
            "diffquant.realized": json.dumps(result.realized),
        }
    )
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    result.model = model
    return result


def _act_qdq(graph: gs.Graph, x: gs.Variable, lp: LayerPlan, scale: float, fdtype) -> gs.Variable:
    fmt: QuantFormat = lp.act
    base = lp.input_group or lp.name
    s = gs.Constant(f"{base}.act_scale", np.array(scale, dtype=fdtype))
    z = gs.Constant(f"{base}.act_zero_point", np.array(0, dtype=np.int8))
    src = x
    if fmt.bits < 8:
        lo = gs.Constant(f"{base}.act_clip_min", np.array(fmt.qmin * scale, dtype=fdtype))
        hi = gs.Constant(f"{base}.act_clip_max", np.array(fmt.qmax * scale, dtype=fdtype))
        src = gs.Variable(f"{base}.act_clipped", dtype=fdtype)
        graph.nodes.append(gs.Node("Clip", f"{base}.act_Clip", inputs=[x, lo, hi], outputs=[src]))
    q = gs.Variable(f"{base}.act_quantized", dtype=np.int8)
    out = gs.Variable(f"{base}.act_dq", dtype=fdtype)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}.act_QuantizeLinear", inputs=[src, s, z], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}.act_DequantizeLinear", inputs=[q, s, z], outputs=[out]))
    return out
