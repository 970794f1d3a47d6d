"""The rules linter: checks a Q/DQ graph against the TensorRT / ONNX Runtime Q/DQ rules (docs/ARCHITECTURE.md) and names the offending node
of every violation. TensorRT rules by default; the ``onnxruntime`` profile also accepts its
U8 activations (zero point 128, the symmetric grid shifted) and Q/DQ on conv outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from diffquant.errors import DiffquantError

__all__ = ["LintReport", "Violation", "declared_limits", "lint", "load_onnx"]

WEIGHT_CONSUMERS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
ACT_CONSUMERS = WEIGHT_CONSUMERS | {"Add"}
INT4 = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
ALLOWED_Q_TYPES = {
    "tensorrt": {onnx.TensorProto.INT8, onnx.TensorProto.INT4},
    "onnxruntime": {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4},
}
SYMMETRIC_ZERO_POINT = {onnx.TensorProto.UINT8: 128}


@dataclass
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


@dataclass
class LintReport:
    path: str
    violations: list[Violation] = field(default_factory=list)
    n_q: int = 0
    n_dq: int = 0
    target: str = ""  # the rule set that was applied

    @property
    def ok(self) -> bool:
        return not self.violations

    def rules(self) -> set[str]:
        return {v.rule for v in self.violations}


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file with a clear error when it is missing or not ONNX."""
    path = Path(path)
    if not path.exists():
        raise DiffquantError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and friends
        raise DiffquantError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node:
        raise DiffquantError(
            f"{path} holds no graph ({path.stat().st_size} bytes: empty or truncated); export it again"
        )
    return model


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.const_types = {i.name: i.data_type for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                t = n.attribute[0].t
                self.consts[n.output[0]] = numpy_helper.to_array(t)
                self.const_types[n.output[0]] = t.data_type
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            vis = [*inferred.value_info, *inferred.input, *inferred.output]
        except Exception:
            vis = [*g.value_info, *g.input, *g.output]
        self.types = {v.name: v.type.tensor_type.elem_type for v in vis}
        self.types.update(self.const_types)

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def from_dq(self, name: str) -> onnx.NodeProto | None:
        p = self.producer.get(name)
        return p if p is not None and p.op_type == "DequantizeLinear" else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _output_axis(consumer: onnx.NodeProto, rank: int) -> int:
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    return rank - 1  # MatMul: [K, N]


def lint(model: onnx.ModelProto, path: str = "<memory>", target: str | None = None) -> LintReport:
    """Check every Q/DQ node against the rules of ``target`` (default: the target the graph
    was lowered for, per its metadata, else ``tensorrt``)."""
    meta = {p.key: p.value for p in model.metadata_props}
    target = target or meta.get("diffquant.target", "tensorrt")
    if target not in ALLOWED_Q_TYPES:
        raise DiffquantError(f"no lint rules for target {target!r}; known: {', '.join(ALLOWED_Q_TYPES)}")
    allowed = ALLOWED_Q_TYPES[target]
    g = _Graph(model)
    rep = LintReport(path=path, target=target)
    add = lambda rule, node, msg: rep.violations.append(Violation(rule, node.name or node.op_type, msg))  # noqa: E731
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    uses_int4_or_blocks = False
    q_readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            if node.op_type == "MatMul":
                a, b = node.input[0], node.input[1]
                weight_b = (dq := g.from_dq(b)) is not None and g.is_const(dq.input[0]) or g.is_const(b)
                if not weight_b and (g.from_dq(a) or g.from_dq(b)):
                    add(
                        "attention-matmul",
                        node,
                        "Q/DQ on an activation x activation MatMul (attention Q.K or P.V): keep it in FP16",
                    )
            continue
        is_q = node.op_type == "QuantizeLinear"
        rep.n_q += is_q
        rep.n_dq += not is_q
        x, s = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        block = _attr(node, "block_size", 0)
        if block:
            uses_int4_or_blocks = True
        # scale: constant, positive, same dtype as the float tensor
        if not g.is_const(s):
            add("scale-constant", node, f"scale {s!r} is not a build-time constant")
            continue
        scale = g.consts[s].astype(np.float64)
        if not (scale > 0).all():
            add(
                "scale-positive",
                node,
                f"scale {s!r} has {(scale <= 0).sum()} non-positive value(s) (tiny amax rounded to 0?)",
            )
        float_name = x if is_q else node.output[0]
        ft = g.types.get(float_name)
        if ft and g.const_types.get(s) != ft:
            add(
                "scale-dtype",
                node,
                f"scale dtype {onnx.TensorProto.DataType.Name(g.const_types[s])} differs from tensor dtype {onnx.TensorProto.DataType.Name(ft)}",
            )
        # zero point: all zero, signed
        qtype = g.const_types.get(zp) if zp else (g.types.get(x) if not is_q else onnx.TensorProto.UINT8)
        if zp:
            want = SYMMETRIC_ZERO_POINT.get(qtype, 0) if target == "onnxruntime" else 0
            if not g.is_const(zp) or np.any(g.consts[zp] != want):
                add("zero-point", node, f"zero point {zp!r} is not all {want} ({target} graphs are symmetric only)")
        if qtype is not None and qtype not in allowed:
            names = "/".join(onnx.TensorProto.DataType.Name(t) for t in sorted(allowed))
            hint = (
                " (this graph may have been lowered for another target: export with --target tensorrt)"
                if target == "tensorrt"
                else ""
            )
            add("q-type", node, f"quantized type {onnx.TensorProto.DataType.Name(qtype)} is not {names}{hint}")
        if qtype in INT4:
            uses_int4_or_blocks = True
        if is_q:
            q_readers.setdefault(x, []).append(node)
            if g.is_const(x):
                continue
            if scale.size != 1:
                add(
                    "per-tensor-activations",
                    node,
                    f"activation {x!r} is quantized with {scale.size} scales; TensorRT needs one per tensor",
                )
            if qtype in INT4:
                add("int4-weight-only", node, f"activation {x!r} quantized to INT4; INT4 is weight-only")
            continue
        consumers = g.consumers.get(node.output[0], [])
        for c in consumers:
            if c.op_type == "Cast":
                add("cast-after-dq", c, f"Cast between DequantizeLinear {node.name!r} and its consumer")
        weight = g.is_const(x)
        if weight:
            w = g.consts[x]
            for c in consumers:
                if c.op_type not in WEIGHT_CONSUMERS:
                    add(
                        "qdq-placement",
                        node,
                        f"weight DQ feeds {c.op_type} {c.name!r}; only Conv/MatMul/Gemm take quantized weights",
                    )
                    continue
                if qtype in INT4:
                    if c.op_type not in ("MatMul", "Gemm"):
                        add(
                            "int4-weight-only",
                            node,
                            f"INT4 weight feeds {c.op_type} {c.name!r}; TensorRT has no INT4 convolution",
                        )
                    if target == "tensorrt" and block not in (64, 128):
                        add("int4-weight-only", node, f"INT4 weight needs block_size 64 or 128 along K, got {block}")
                    elif block < 16 or block & (block - 1):
                        add(
                            "int4-weight-only",
                            node,
                            f"MatMulNBits needs a power-of-two block_size >= 16 along K, got {block}",
                        )
                if scale.size > 1 and not block:
                    axis = _attr(node, "axis", 1)
                    axis = axis % w.ndim
                    want = _output_axis(c, w.ndim)
                    if axis != want:
                        add(
                            "per-channel-weights",
                            node,
                            f"weight scales on axis {axis}, but {c.op_type} {c.name!r} has output channels on axis {want}",
                        )
        else:
            prod = g.producer.get(x)
            if prod is None or prod.op_type != "QuantizeLinear":
                add("qdq-placement", node, f"DequantizeLinear of non-constant {x!r} has no QuantizeLinear producer")
            for c in consumers if target == "tensorrt" else ():
                if c.op_type not in ACT_CONSUMERS:
                    add(
                        "qdq-placement",
                        node,
                        f"activation DQ feeds {c.op_type} {c.name!r}; Q/DQ belongs only on inputs of Conv/MatMul/Gemm (or Add)",
                    )
    for tensor, qs in q_readers.items():
        if len(qs) > 1 and not g.is_const(tensor):
            for q in qs[1:]:
                add(
                    "shared-tensor",
                    q,
                    f"tensor {tensor!r} has {len(qs)} QuantizeLinear nodes; shared tensors need one Q/DQ for all readers",
                )
    _check_weight_grids(model, g, add)
    if uses_int4_or_blocks and opset < 21:
        rep.violations.append(Violation("opset", "<model>", f"INT4 or block_size needs opset >= 21, model has {opset}"))
    return rep


def declared_limits(bits: int | str, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest code per channel of a declared grid: ``bits`` one width or a string
    of per-channel widths (one digit each); one bit is the sign (-1 / +1); ``shift`` is the
    power-of-two left shift of the codes (PTS)."""
    b = np.array([int(c) for c in bits] if isinstance(bits, str) else [int(bits)])
    lo = np.where(b == 1, -1, -(2 ** (b - 1)))
    hi = np.where(b == 1, 1, 2 ** (b - 1) - 1)
    return lo * 2**shift, hi * 2**shift


def _check_weight_grids(model: onnx.ModelProto, g, add) -> None:
    """Every weight's integer codes stay inside the grid the exporter declared for it
    (``diffquant.weight_grids``), per output channel: an n-bit grid in an INT8 container, or
    MPQ-DM's per-channel N-1 / N / N+1-bit grids."""
    meta = {p.key: p.value for p in model.metadata_props}
    grids = json.loads(meta.get("diffquant.weight_grids", "{}"))
    dq_of = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for name, d in grids.items():
        dq = dq_of.get(name)
        if name not in g.consts or dq is None:
            continue
        codes = g.consts[name].astype(np.int64) - int(d.get("zero_point", 0))
        codes = np.moveaxis(codes, int(d["axis"]) % codes.ndim, 0).reshape(codes.shape[int(d["axis"]) % codes.ndim], -1)
        lo, hi = declared_limits(d["bits"], int(d.get("shift", 0)))
        if len(lo) not in (1, len(codes)):
            add("weight-code-range", dq, f"{name}: {len(lo)} declared channel widths for {len(codes)} channels")
            continue
        bad = np.nonzero((codes.min(axis=1) < lo) | (codes.max(axis=1) > hi))[0]
        if len(bad):
            c = int(bad[0])
            add(
                "weight-code-range",
                dq,
                f"{name}: channel {c} has codes in [{codes[c].min()}, {codes[c].max()}] outside its declared "
                f"[{lo[c % len(lo)]}, {hi[c % len(hi)]}] ({len(bad)} channel(s) out of range)",
            )
