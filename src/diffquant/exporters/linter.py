"""The rules linter: checks a Q/DQ graph against its target's Q/DQ rules (`diffquant.targets`;
docs/ARCHITECTURE.md) and names the offending node of every violation. TensorRT rules by default;
the ``onnxruntime`` target also accepts its U8 activations (zero point 128, the symmetric grid
shifted) and Q/DQ on conv outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from diffquant.errors import DiffquantError
from diffquant.targets import TARGETS, Target

__all__ = ["LintReport", "Violation", "declared_limits", "lint", "load_onnx"]

WEIGHT_CONSUMERS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
ACT_CONSUMERS = WEIGHT_CONSUMERS | {"Add"}
INT4 = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


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
    name = target or meta.get("diffquant.target", "tensorrt")
    if name not in TARGETS:
        raise DiffquantError(f"no lint rules for target {name!r}; known: {', '.join(TARGETS)}")
    return _Linter(model, path, TARGETS[name]).run()


class _Linter:
    """One pass over a graph's nodes; each kind of node has its own check, each finding one
    `Violation` naming the rule and the node."""

    def __init__(self, model: onnx.ModelProto, path: str, target: Target) -> None:
        self.model, self.target, self.g = model, target, _Graph(model)
        self.rep = LintReport(path=path, target=target.name)
        self.allowed = {getattr(onnx.TensorProto, t) for t in target.q_types}
        self.int4_or_blocks = False
        self.q_readers: dict[str, list[onnx.NodeProto]] = {}

    def add(self, rule: str, node: onnx.NodeProto, msg: str) -> None:
        self.rep.violations.append(Violation(rule, node.name or node.op_type, msg))

    def run(self) -> LintReport:
        for node in self.model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                self._qdq(node)
            elif node.op_type == "MatMul":
                self._matmul(node)
        for tensor, qs in self.q_readers.items():
            if len(qs) > 1 and not self.g.is_const(tensor):
                for q in qs[1:]:
                    msg = f"tensor {tensor!r} has {len(qs)} QuantizeLinear nodes; shared tensors need one Q/DQ for all"
                    msg += " readers"
                    self.add("shared-tensor", q, msg)
        _check_weight_grids(self.model, self.g, self.add)
        opset = max((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if self.int4_or_blocks and opset < 21:
            msg = f"INT4 or block_size needs opset >= 21, model has {opset}"
            self.rep.violations.append(Violation("opset", "<model>", msg))
        return self.rep

    def _matmul(self, node: onnx.NodeProto) -> None:
        g, (a, b) = self.g, node.input[:2]
        weight_b = (dq := g.from_dq(b)) is not None and g.is_const(dq.input[0]) or g.is_const(b)
        if not weight_b and (g.from_dq(a) or g.from_dq(b)):
            msg = "Q/DQ on an activation x activation MatMul (attention Q.K or P.V): keep it in FP16"
            self.add("attention-matmul", node, msg)

    def _qdq(self, node: onnx.NodeProto) -> None:
        """The checks every Q and DQ share (scale, zero point, type), then the Q's or the DQ's own."""
        is_q = node.op_type == "QuantizeLinear"
        self.rep.n_q += is_q
        self.rep.n_dq += not is_q
        s, block = node.input[1], _attr(node, "block_size", 0)
        self.int4_or_blocks |= bool(block)
        if not self.g.is_const(s):
            self.add("scale-constant", node, f"scale {s!r} is not a build-time constant")
            return
        scale = self.g.consts[s].astype(np.float64)
        qtype = self._scale_and_type(node, scale, is_q=is_q)
        self.int4_or_blocks |= qtype in INT4
        if is_q:
            self._q(node, scale, qtype)
        else:
            self._dq(node, scale, qtype, block)

    def _scale_and_type(self, node: onnx.NodeProto, scale: np.ndarray, *, is_q: bool) -> int | None:
        """Scale positive and of the float tensor's dtype, zero point symmetric, quantized type
        allowed; returns the quantized type."""
        g, x, s = self.g, node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if not (scale > 0).all():
            msg = f"scale {s!r} has {(scale <= 0).sum()} non-positive value(s) (tiny amax rounded to 0?)"
            self.add("scale-positive", node, msg)
        ft = g.types.get(x if is_q else node.output[0])
        if ft and g.const_types.get(s) != ft:
            got, want = (onnx.TensorProto.DataType.Name(t) for t in (g.const_types[s], ft))
            self.add("scale-dtype", node, f"scale dtype {got} differs from tensor dtype {want}")
        qtype = g.const_types.get(zp) if zp else (g.types.get(x) if not is_q else onnx.TensorProto.UINT8)
        type_name = onnx.TensorProto.DataType.Name(qtype) if qtype is not None else ""
        if zp:
            want = self.target.symmetric_zero_point(type_name) if type_name in self.target.q_types else 0
            if not g.is_const(zp) or np.any(g.consts[zp] != want):
                msg = f"zero point {zp!r} is not all {want} ({self.target.name} graphs are symmetric only)"
                self.add("zero-point", node, msg)
        if qtype is not None and qtype not in self.allowed:
            names = "/".join(onnx.TensorProto.DataType.Name(t) for t in sorted(self.allowed))
            other = any(type_name in t.q_types for t in TARGETS.values() if t is not self.target)
            hint = f" (this graph may have been lowered for another target: export with --target {self.target.name})"
            self.add("q-type", node, f"quantized type {type_name} is not {names}{hint if other else ''}")
        return qtype

    def _q(self, node: onnx.NodeProto, scale: np.ndarray, qtype: int | None) -> None:
        x = node.input[0]
        self.q_readers.setdefault(x, []).append(node)
        if self.g.is_const(x):
            return
        if scale.size != 1:
            msg = f"activation {x!r} is quantized with {scale.size} scales; TensorRT needs one per tensor"
            self.add("per-tensor-activations", node, msg)
        if qtype in INT4:
            self.add("int4-weight-only", node, f"activation {x!r} quantized to INT4; INT4 is weight-only")

    def _dq(self, node: onnx.NodeProto, scale: np.ndarray, qtype: int | None, block: int) -> None:
        g, x = self.g, node.input[0]
        consumers = g.consumers.get(node.output[0], [])
        for c in consumers:
            if c.op_type == "Cast":
                self.add("cast-after-dq", c, f"Cast between DequantizeLinear {node.name!r} and its consumer")
        if g.is_const(x):
            for c in consumers:
                self._weight_consumer(node, c, scale, qtype, block)
            return
        prod = g.producer.get(x)
        if prod is None or prod.op_type != "QuantizeLinear":
            self.add("qdq-placement", node, f"DequantizeLinear of non-constant {x!r} has no QuantizeLinear producer")
        for c in consumers if self.target.strict_placement else ():
            if c.op_type not in ACT_CONSUMERS:
                msg = (
                    f"activation DQ feeds {c.op_type} {c.name!r}; Q/DQ belongs only on inputs of Conv/MatMul/Gemm "
                    "(or Add)"
                )
                self.add("qdq-placement", node, msg)

    def _weight_consumer(
        self, node: onnx.NodeProto, c: onnx.NodeProto, scale: np.ndarray, qtype: int | None, block: int
    ) -> None:
        """A weight DQ feeds a Conv / MatMul / Gemm, INT4 only as blocks on MatMul / Gemm, and its
        per-channel scales lie on the consumer's output-channel axis."""
        if c.op_type not in WEIGHT_CONSUMERS:
            msg = f"weight DQ feeds {c.op_type} {c.name!r}; only Conv/MatMul/Gemm take quantized weights"
            self.add("qdq-placement", node, msg)
            return
        if qtype in INT4:
            if c.op_type not in ("MatMul", "Gemm"):
                msg = f"INT4 weight feeds {c.op_type} {c.name!r}; TensorRT has no INT4 convolution"
                self.add("int4-weight-only", node, msg)
            problem = self.target.int4_block_problem(block)
            if problem:
                self.add("int4-weight-only", node, problem)
        if scale.size > 1 and not block:
            w = self.g.consts[node.input[0]]
            axis, want = _attr(node, "axis", 1) % w.ndim, _output_axis(c, w.ndim)
            if axis != want:
                msg = f"weight scales on axis {axis}, but {c.op_type} {c.name!r} has output channels on axis {want}"
                self.add("per-channel-weights", node, msg)


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
