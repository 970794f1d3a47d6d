"""FP ONNX export of a denoiser (TorchScript exporter, opset 21) with the family's named inputs,
a dynamic batch, and a dynamic text length where the model takes any prompt length.

Layer names survive: Conv weights keep their parameter names and Linear layers export as
``Transpose(weight) -> MatMul`` (constant folding off), which the Q/DQ lowering relies on.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx.version_converter
import torch

from diffquant._io import atomic_path
from diffquant.errors import DiffquantError
from diffquant.models.denoiser import Denoiser

__all__ = ["FLOAT_DTYPES", "MODULE_PREFIX", "export_fp_onnx", "fp_onnx_proto", "module_onnx_proto", "save_onnx"]

EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph itself

MODULE_PREFIX = "model."
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
OPSET = 21
TORCHSCRIPT_OPSET = 20  # the TorchScript exporter's newest; upgraded to OPSET after export


def _rms_norm(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm`` (Flux / SD3.5 query-key norms) for the TorchScript exporter, which has
    no symbolic for it before opset 23: x / sqrt(mean(x^2 over the last axis) + eps) * weight."""
    from torch.onnx import symbolic_helper as sh

    eps_v = sh._maybe_get_const(eps, "f")  # torch's default (eps None) is the machine epsilon
    eps_v = float(torch.finfo(torch.float32).eps) if eps_v is None or sh._is_none(eps) else float(eps_v)
    mean = g.op(
        "ReduceMean", g.op("Mul", x, x), g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64)), keepdims_i=1
    )
    denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_v, dtype=torch.float32))))
    out = g.op("Div", x, g.op("CastLike", denom, x))
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


@contextmanager
def _trace_friendly_ops() -> Iterator[None]:
    """Two tensor methods whose TorchScript ONNX symbolics break dynamic shapes, replaced by the
    same math while exporting: ``unflatten`` (its symbolic bakes the traced batch into the
    Reshape: Flux's attention then fails at any other batch) and ``squeeze(dim)`` of a dimension
    that is not 1 (a no-op that the exporter turns into an ``If`` ONNX Runtime cannot type:
    PixArt's ada-norm-single blocks)."""
    unflatten, squeeze = torch.Tensor.unflatten, torch.Tensor.squeeze

    def flat(self, dim, sizes):
        dim, sizes = dim % self.dim(), list(sizes)
        if -1 in sizes:
            known = math.prod(v for v in sizes if v != -1)
            sizes[sizes.index(-1)] = self.shape[dim] // known
        return self.reshape(*self.shape[:dim], *sizes, *self.shape[dim + 1 :])

    def sq(self, *args, **kwargs):
        dim = args[0] if args else kwargs.get("dim")
        if isinstance(dim, int) and self.dim() and self.shape[dim] != 1:
            return self
        return squeeze(self, *args, **kwargs)

    torch.Tensor.unflatten, torch.Tensor.squeeze = flat, sq
    try:
        yield
    finally:
        torch.Tensor.unflatten, torch.Tensor.squeeze = unflatten, squeeze


def fp_onnx_proto(denoiser: Denoiser, float_dtype: str = "float32", batch: int = 2) -> onnx.ModelProto:
    """Export ``denoiser`` to an in-memory ModelProto whose float tensors are ``float_dtype``.

    The timestep input stays FP32 in every case: its sinusoidal embedding loses whole steps
    in FP16 (t up to 999), so the graph casts to FP16 only after the sinusoid.
    """
    if float_dtype not in FLOAT_DTYPES:
        raise DiffquantError(f"float dtype must be one of {sorted(FLOAT_DTYPES)}, got {float_dtype!r}")
    dtype = FLOAT_DTYPES[float_dtype]
    model = copy.deepcopy(denoiser).eval()
    model.to(dtype)
    specs = denoiser.input_specs()
    example = denoiser.example_inputs(batch)
    # float inputs take the graph's dtype, except the timestep and guidance scale (see above)
    args = tuple(
        example[s.name].to(dtype)
        if example[s.name].is_floating_point() and s.role not in ("timestep", "guidance")
        else example[s.name]
        for s in specs
    )
    axes = {**{s.name: s.dynamic_axes for s in specs}, denoiser.output_names[0]: {0: "batch"}}
    proto = module_onnx_proto(model, args, [s.name for s in specs], list(denoiser.output_names), axes, denoiser.name)
    meta = {
        "diffquant.model": denoiser.name,
        "diffquant.float_dtype": float_dtype,
        "diffquant.module_prefix": MODULE_PREFIX,
    }
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    return proto


def module_onnx_proto(
    module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str], dynamic_axes: dict, what: str
) -> onnx.ModelProto:
    """Export ``module(*args)`` with the TorchScript exporter (constant folding off, so layer
    names survive), upgraded to opset 21: the one export path of denoisers and pipeline parts."""
    buf = io.BytesIO()
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, TORCHSCRIPT_OPSET)
    with warnings.catch_warnings(), torch.no_grad(), _trace_friendly_ops():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=TORCHSCRIPT_OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            do_constant_folding=False,
        )
    proto = onnx.load_model_from_string(buf.getvalue())
    try:
        return onnx.version_converter.convert_version(proto, OPSET)
    except Exception as e:  # the converter raises plain RuntimeErrors
        raise DiffquantError(f"could not upgrade the exported graph of {what} to opset {OPSET}: {e}") from None


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Check and write ``proto`` atomically; a graph over 2 GB goes to ONNX external data (one
    ``<file>.data`` beside it, written first, so the graph never names a missing file)."""
    path = Path(path)
    if proto.ByteSize() < EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(proto)
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
        return path
    out = onnx.ModelProto()
    out.CopyFrom(proto)  # saving as external data rewrites the tensors in place
    with atomic_path(path) as tmp:
        onnx.save_model(
            out,
            str(tmp),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
        onnx.checker.check_model(str(tmp))
    return path


def export_fp_onnx(denoiser: Denoiser, path: str | Path, float_dtype: str = "float32") -> Path:
    """Export the FP graph to ``path`` (atomically) and check it with the ONNX checker."""
    return save_onnx(fp_onnx_proto(denoiser, float_dtype), path)
