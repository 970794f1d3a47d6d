"""Lowering a QuantPlan into Q/DQ nodes on the FP ONNX graph, for a target profile.

See docs/ARCHITECTURE.md (targets and backends): weights become INT8 initializers (values on the
plan's n-bit grid) behind a per-output-channel DequantizeLinear, or INT4 initializers with a blocked
DequantizeLinear for block formats on MatMul (weight-only); each quantized layer's input gets one
per-tensor QuantizeLinear/DequantizeLinear pair, shared by every quantized reader of that tensor;
grids under 8 bits add a Clip to the k-bit range before Q. Scales have the graph's float dtype.
Equivalent scaling (an input site's multiplier) and power-of-two scaling (its PTS exponents) make
one per-channel multiplier before the shared Q: folded into the producer where that is exact (a
LayerNormalization's scale and bias, or a constant Mul -> Add affine such as a GroupNorm's, whose
output only the layers of this input group read), else one Mul. PTS weights are the n-bit codes
shifted left by (K - k) per input channel with weight scale s_w / 2^K, inside INT8. A shortcut-split
conv becomes two convs (one per concat input, each behind its own Q/DQ) + Add.

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
from diffquant.targets import Target, get_target

__all__ = ["LoweringResult", "code_range", "graph_float_dtype", "lower_plan"]

NP_FLOAT = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


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
            f"layer {layer}: weight {weight_name!r} is not in the exported graph (was it exported with constant "
            "folding?)"
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
    prof = get_target(target)
    if plan.state not in ("frozen", "exported"):
        raise DiffquantError(
            f"plan for {plan.model} is {plan.state!r}: export needs a frozen plan (finish `diffquant quantize`)"
        )
    if not 0 <= group < plan.n_groups:
        raise DiffquantError(f"timestep group {group} does not exist; the plan has {plan.n_groups}")
    research = [str(s.key) for lp in plan.quantized_layers() for s in lp.sites.values() if s.format.research_only]
    if research:
        kind = plan.sites[research[0]].format.kind
        raise DiffquantError(
            f"site {research[0]} has a {kind} grid, which is research only (no Q/DQ form): evaluate it in "
            "fake-quant, or re-quantize with a uniform recipe"
        )
    low = _Lowering(fp_model, plan, prof, weights, group)
    for lp in plan.quantized_layers():
        low.result.realized[lp.name] = low.layer(lp)
    for site in plan.operands.values():  # DAQ's attention probabilities: no Q/DQ in either target's graph
        act = f"P: {site.format.kind} {site.format.max_bits}-bit in the research form only; deployed in floating point"
        low.result.realized[str(site.key)] = {"op": "Softmax -> P.V", "weight": "-", "act": act}
    low.result.model = low.finish(fp_model)
    return low.result


class _Lowering:
    """One lowering of a plan onto a graph: the graph being edited, the plan, its timestep group
    and the target, and what was emitted so far (the shared activation Q/DQ per tensor, the
    INT4 initializers to pack, the result)."""

    def __init__(
        self, fp_model: onnx.ModelProto, plan: QuantPlan, prof: Target, weights: dict | None, group: int
    ) -> None:
        self.plan, self.prof, self.weights, self.group = plan, prof, weights, group
        self.fdtype = graph_float_dtype(fp_model)
        self.graph = gs.import_onnx(fp_model)
        self.tensors = self.graph.tensors()
        self.result = LoweringResult(model=fp_model)
        self.act_q: dict[str, tuple] = {}  # input tensor -> (dq out, scale, first layer, multiplier bytes, where)
        self.int4: set[str] = set()
        # graph node of each activation-quantized layer -> its input multiplier's bytes (folding
        # into a producer is exact only when every reader of its output takes the same multiplier)
        self.readers: dict[str, bytes | None] = {}
        for lp in plan.quantized_layers():
            if lp.act and not lp.split:
                mult = plan.act_multiplier(lp.name, group)
                node = _find_weight_consumer(self.graph, f"{MODULE_PREFIX}{lp.name}.weight", lp.name)[0]
                self.readers[node.name] = None if mult is None else _bytes(mult)

    def layer(self, lp: LayerPlan) -> dict:
        """Lower one layer; what was realized for it."""
        weight_name = f"{MODULE_PREFIX}{lp.name}.weight"
        node, how = _find_weight_consumer(self.graph, weight_name, lp.name)
        info: dict = {"node": node.name, "op": node.op}
        requantize = self.prof.requantize_conv_outputs
        if lp.split and lp.act:
            if node.op != "Conv" or not lp.weight:
                raise DiffquantError(f"layer {lp.name}: a shortcut split lowers only on a conv with quantized weights")
            add = self.split_conv(node, lp, self._weight_of(lp, weight_name), info)
            if requantize:  # after the Add: the same output rounding as fake-quant (not fused)
                info["output"] = self.requantize_output(add, lp)
            return info
        info["weight"] = self._weight(lp, node, how, weight_name) if lp.weight else "FP"
        info["act"] = "FP"
        if lp.act:
            info["act"], where = self._act(lp, node)
            if where:
                info["act_multiplier"] = where
        if requantize and node.op == "Conv" and lp.act:
            info["output"] = self.requantize_output(node, lp)
        return info

    def _weight_of(self, lp: LayerPlan, weight_name: str) -> torch.Tensor:
        """The FP weight the plan quantizes: its replacement, the given weights, else the graph's."""
        w = self.plan.weights.get(lp.name)
        if w is None and self.weights is not None and f"{lp.name}.weight" in self.weights:
            w = self.weights[f"{lp.name}.weight"]
        if w is None:
            w = torch.from_numpy(np.asarray(self.tensors[weight_name].values).astype(np.float32))
        return w

    def _weight(self, lp: LayerPlan, node: gs.Node, how: str, weight_name: str) -> str:
        pts = self.plan.pts_exponents(lp.name, self.group)
        w, scale = self._weight_of(lp, weight_name), self.plan.weight_scale(lp.name)
        dq_out, wi = self.weight_dq(lp, w, scale, node, how, pts)
        self.graph.nodes.append(wi["node"])
        node.inputs[1] = dq_out
        if "int4" in wi:
            self.int4.add(wi["int4"])
        if "grid" in wi:
            self.result.weight_grids[wi["grid"][0]] = wi["grid"][1]
        return wi["desc"]

    def _act(self, lp: LayerPlan, node: gs.Node) -> tuple[str, str]:
        """The layer's input behind its shared Q/DQ; what was realized, and where its multiplier went."""
        x = node.inputs[0]
        mult = self.plan.act_multiplier(lp.name, self.group)
        node.inputs[0] = self.shared_qdq(x, lp, float(self.plan.act_scale(lp.name, self.group)), mult, node.op)
        clip = "" if lp.act.bits == 8 else f", Clip to {lp.act.bits}-bit range"
        where = self.act_q[x.name][4] if mult is not None else ""
        return f"{np.dtype(self.prof.act_dtype).name.upper()} per-tensor{clip}", where

    def weight_dq(
        self, lp: LayerPlan, w: torch.Tensor, scale: torch.Tensor, node: gs.Node, how: str, pts: torch.Tensor | None
    ) -> tuple[gs.Variable, dict]:
        """The integer weight initializer of ``lp`` behind its DequantizeLinear: INT4 blocks along
        K for block formats (weight-only MatMul), else per-output-channel codes in the target's
        weight type; PTS shifts the codes left by (K - k) per input channel, scale s_w / 2^K."""
        fmt: QuantFormat = lp.weight
        q = quantize_int(w.float(), scale.float(), fmt)
        shift, big = "", 0
        if pts is not None:
            q, scale, big = _shift_codes(q, scale, fmt, pts, lp.name)
            shift = f", codes shifted left by {big} - k per input channel (power-of-two scaling)"
        q = q.to(torch.int8)
        if isinstance(fmt.granularity, PerBlock):
            return self._block_dq(lp, q, scale, node, how)
        if how == "transposed":  # Linear as MatMul(x, W^T): weight [K, N], output channels on axis 1
            q, axis = q.t().contiguous(), 1
        elif node.op == "Gemm":
            axis = 0 if node.attrs.get("transB", 0) else 1
        else:
            axis = 0
        name, fdtype = lp.name, self.fdtype
        wdt, zp = np.dtype(self.prof.weight_dtype), self.prof.weight_zero_point
        wq = gs.Constant(f"{name}.weight_quantized", (q.numpy().astype(np.int16) + zp).astype(wdt))
        ws = gs.Constant(f"{name}.weight_scale", scale.numpy().astype(fdtype))
        wz = gs.Constant(f"{name}.weight_zero_point", np.full(scale.shape, zp, wdt))
        out = gs.Variable(f"{name}.weight_dq", dtype=fdtype)
        dq = gs.Node("DequantizeLinear", f"{name}.weight_DequantizeLinear", {"axis": axis}, [wq, ws, wz], [out])
        if fmt.mixed:
            grid = f" (per-channel {min(fmt.bits)}..{max(fmt.bits)}-bit grids)"
        else:
            grid = "" if fmt.bits == 8 else f" ({fmt.bits}-bit grid)"
        bits = "".join(map(str, fmt.bits)) if fmt.mixed else fmt.bits
        declared = {"axis": axis, "bits": bits, "shift": big, "zero_point": zp}
        desc = f"{wdt.name.upper()}{grid} per-channel axis {axis}{shift}"
        return out, {"node": dq, "axis": axis, "desc": desc, "grid": (wq.name, declared)}

    def _block_dq(
        self, lp: LayerPlan, q: torch.Tensor, scale: torch.Tensor, node: gs.Node, how: str
    ) -> tuple[gs.Variable, dict]:
        """INT4 weight-only blocks along K of a MatMul weight (packed to INT4 in `finish`)."""
        fmt, name = lp.weight, lp.name
        if how != "transposed" or fmt.max_bits > 4 or lp.act is not None:
            raise DiffquantError(
                f"layer {name}: block formats lower only to INT4 weight-only MatMul weights (bits like w4g64a16); "
                f"got {fmt.bits}-bit blocks on a {node.op}{' with quantized activations' if lp.act else ''}"
            )
        qk = q.t().contiguous().numpy()  # [K, N], blocks along K (axis 0); typed INT4 after export
        wq = gs.Constant(f"{name}.weight_quantized", qk)
        ws = gs.Constant(f"{name}.weight_scale", scale.t().contiguous().numpy().astype(self.fdtype))
        out = gs.Variable(f"{name}.weight_dq", dtype=self.fdtype)
        attrs = {"axis": 0, "block_size": fmt.granularity.size}
        dq = gs.Node("DequantizeLinear", f"{name}.weight_DequantizeLinear", attrs, [wq, ws], [out])
        return out, {"node": dq, "axis": 0, "desc": f"INT4 blocks of {fmt.granularity.size} along K", "int4": wq.name}

    def shared_qdq(self, x: gs.Variable, lp: LayerPlan, scale: float, mult, op: str, kind: str = "act") -> gs.Variable:
        """The activation Q/DQ of tensor ``x`` for layer ``lp``: reused when another quantized layer
        already reads ``x`` (it must have the same scale and multiplier: one Q/DQ per tensor), else
        ``[per-channel multiplier ->] [Clip ->] Q -> DQ``, the multiplier folded into the producer
        of ``x`` where exact (see `_fold_multiplier`), else a Mul."""
        key = None if mult is None else _bytes(mult)
        if x.name in self.act_q:
            dq_out, prev, first, prev_key, _ = self.act_q[x.name]
            if prev != scale or prev_key != key:
                what = "activation scales" if prev != scale else "input multipliers (smoothing / power-of-two)"
                raise DiffquantError(
                    f"layers {first} and {lp.name} read the same tensor {x.name!r} with different {what} "
                    f"({prev:g} vs {scale:g}); TensorRT needs one Q/DQ per tensor: give them one input group"
                )
            self.result.act_dq[dq_out.name]["layers"].append(lp.name)
            return dq_out
        base = f"{lp.input_group or lp.name}" if kind == "act" else f"{lp.name}.{kind}"
        src, where = x, ""
        if mult is not None:
            src, where = self._multiply(x, np.asarray(mult, dtype=np.float32), key, base, channels_last=op != "Conv")
        dq_out = self.qdq(src, base, "act", scale, lp.act)
        self.act_q[x.name] = (dq_out, scale, lp.name, key, where)
        self.result.act_dq[dq_out.name] = {"input": src.name, "layers": [lp.name], "scale": scale, "bits": lp.act.bits}
        return dq_out

    def _multiply(
        self, x: gs.Variable, mult: np.ndarray, key: bytes | None, base: str, *, channels_last: bool
    ) -> tuple[gs.Variable, str]:
        """``x`` times the per-channel multiplier: folded into its producer where exact (the
        tensor stays ``x``), else through one Mul; returns the tensor and where it went."""
        where = _fold_multiplier(x, mult, key, self.readers, self.fdtype, base, channels_last=channels_last)
        if where:
            return x, where
        shape = [-1] + ([] if channels_last else [1, 1])
        m = gs.Constant(f"{base}.act_smooth", mult.reshape(shape).astype(self.fdtype))
        src = gs.Variable(f"{base}.act_smoothed", dtype=self.fdtype)
        self.graph.nodes.append(gs.Node("Mul", f"{base}.act_smooth_Mul", inputs=[x, m], outputs=[src]))
        return src, f"one Mul before Q ({base}.act_smooth_Mul)"

    def split_conv(self, node: gs.Node, lp: LayerPlan, w: torch.Tensor, info: dict) -> gs.Node:
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
        c, scale = lp.split, self.plan.weight_scale(lp.name)
        half1 = LayerPlan.new(f"{lp.name}.half1", lp.op, lp.rule, lp.weight, lp.act)
        w0, wi = self.weight_dq(lp, w[:, :c], scale, node, "direct", None)
        w1, wi1 = self.weight_dq(half1, w[:, c:], scale, node, "direct", None)
        self.graph.nodes += [wi["node"], wi1["node"]]
        self.result.weight_grids.update(dict([wi["grid"], wi1["grid"]]))
        act_only = LayerPlan.new(lp.name, lp.op, lp.rule, None, lp.act)
        dqs = [
            self.shared_qdq(
                piece, act_only, float(self.plan.act_scale(lp.name, self.group, half)), None, "Conv", f"act{half}"
            )
            for half, piece in enumerate(cat.inputs)
        ]
        y, fdtype = node.outputs[0], self.fdtype
        part0, part1 = gs.Variable(f"{lp.name}.part0", dtype=fdtype), gs.Variable(f"{lp.name}.part1", dtype=fdtype)
        node.inputs[0], node.inputs[1] = dqs[0], w0
        node.outputs = [part0]
        self.graph.nodes.append(gs.Node("Conv", f"{lp.name}.half1_Conv", dict(node.attrs), [dqs[1], w1], [part1]))
        add = gs.Node("Add", f"{lp.name}.split_Add", inputs=[part0, part1], outputs=[y])
        self.graph.nodes.append(add)
        clip = "" if lp.act.bits == 8 else f", Clip to {lp.act.bits}-bit range"
        info["weight"] = f"{wi['desc']}, split in two convs at input channel {c}"
        act = np.dtype(self.prof.act_dtype).name.upper()
        info["act"] = f"{act} per-tensor{clip}, one Q/DQ per concat input (shortcut split: two convs + Add)"
        return add

    def requantize_output(self, node: gs.Node, lp: LayerPlan) -> str:
        """Put a Q/DQ on a conv's output so ONNX Runtime fuses QLinearConv; without a recorded
        output scale the conv stays unfused (correct, but slower on CPU)."""
        scale = self.plan.out_scale(lp.name, self.group)
        if scale is None:
            return "not requantized (plan has no output scale): runs as DQ -> Conv, unfused"
        y = node.outputs[0]
        raw = gs.Variable(f"{lp.name}.out_raw", dtype=self.fdtype)
        node.outputs = [raw]
        dq_out = self.qdq(raw, lp.name, "out", scale, OUT_FORMAT, out=y)
        self.result.act_dq[dq_out.name] = {
            "input": raw.name,
            "layers": [lp.name],
            "scale": scale,
            "bits": 8,
            "kind": "output",
        }
        return f"{np.dtype(self.prof.act_dtype).name.upper()} Q/DQ on the output (fuses to QLinearConv)"

    def qdq(
        self, x: gs.Variable, base: str, kind: str, scale: float, fmt: QuantFormat, out: gs.Variable | None = None
    ) -> gs.Variable:
        """Append ``[Clip ->] QuantizeLinear -> DequantizeLinear`` on ``x``; names ``<base>.<kind>_*``."""
        fdtype, prof = self.fdtype, self.prof
        s = gs.Constant(f"{base}.{kind}_scale", np.array(scale, dtype=fdtype))
        z = gs.Constant(f"{base}.{kind}_zero_point", np.array(prof.act_zero_point, dtype=prof.act_dtype))
        src = x
        if fmt.bits < 8:
            lo = gs.Constant(f"{base}.{kind}_clip_min", np.array(fmt.qmin * scale, dtype=fdtype))
            hi = gs.Constant(f"{base}.{kind}_clip_max", np.array(fmt.qmax * scale, dtype=fdtype))
            src = gs.Variable(f"{base}.{kind}_clipped", dtype=fdtype)
            self.graph.nodes.append(gs.Node("Clip", f"{base}.{kind}_Clip", inputs=[x, lo, hi], outputs=[src]))
        q = gs.Variable(f"{base}.{kind}_quantized", dtype=prof.act_dtype)
        out = out if out is not None else gs.Variable(f"{base}.{kind}_dq", dtype=fdtype)
        self.graph.nodes.append(
            gs.Node("QuantizeLinear", f"{base}.{kind}_QuantizeLinear", inputs=[src, s, z], outputs=[q])
        )
        self.graph.nodes.append(
            gs.Node("DequantizeLinear", f"{base}.{kind}_DequantizeLinear", inputs=[q, s, z], outputs=[out])
        )
        return out

    def finish(self, fp_model: onnx.ModelProto) -> onnx.ModelProto:
        """The edited graph as a ModelProto: INT4 initializers packed, the FP model's IR version and
        opsets, and the metadata the linter, `build` and parity read."""
        self.graph.cleanup().toposort()
        model = gs.export_onnx(self.graph)
        for init in model.graph.initializer:  # onnx-graphsurgeon writes int8 bytes; pack the INT4 ones
            if init.name in self.int4:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(ml_dtypes.int4), init.name))
        model.ir_version = fp_model.ir_version
        del model.opset_import[:]
        model.opset_import.extend(fp_model.opset_import)
        plan, res = self.plan, self.result
        meta = {p.key: p.value for p in fp_model.metadata_props}
        meta.update(
            {
                "diffquant.target": self.prof.name,
                "diffquant.bits": plan.request,
                "diffquant.recipe": str(plan.recipe.get("name", "")),
                "diffquant.plan_model_digest": plan.model_digest,
                "diffquant.timestep_group": str(self.group),
                "diffquant.timestep_range": json.dumps(
                    plan.timestep_groups[self.group] if plan.timestep_groups else []
                ),
                "diffquant.act_dq": json.dumps(res.act_dq),
                "diffquant.realized": json.dumps(res.realized),
                "diffquant.weight_grids": json.dumps(res.weight_grids),
            }
        )
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        return model


def _shift_codes(
    q: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, pts: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Power-of-two scaling inside INT8: codes * 2^(K - k) per input channel, scale s_w / 2^K."""
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
    return q, scale, big


def _bytes(v) -> bytes:
    return np.asarray(v, dtype=np.float32).tobytes()


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
    x: gs.Variable, mult: np.ndarray, key: bytes | None, readers: dict, fdtype, base: str, *, channels_last: bool
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
