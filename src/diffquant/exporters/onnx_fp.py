"""FP ONNX export of a denoiser (TorchScript exporter, opset 21, dynamic batch).

Layer names survive: Conv weights keep their parameter names and Linear layers export as
``Transpose(weight) -> MatMul`` (constant folding off), which the Q/DQ lowering relies on.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import onnx
import onnx.version_converter
import torch

from diffquant._io import atomic_path
from diffquant.errors import DiffquantError
from diffquant.models.denoiser import Denoiser

__all__ = ["FLOAT_DTYPES", "MODULE_PREFIX", "export_fp_onnx", "fp_onnx_proto"]

MODULE_PREFIX = "model."
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
OPSET = 21
TORCHSCRIPT_OPSET = 20  # the TorchScript exporter's newest; upgraded to OPSET after export


def fp_onnx_proto(denoiser: Denoiser, float_dtype: str = "float32", batch: int = 2) -> onnx.ModelProto:
    """Export ``denoiser`` to an in-memory ModelProto whose float tensors are ``float_dtype``.

    The timestep input stays FP32 in every case: its sinusoidal embedding loses whole steps
    in FP16 (t up to 999), so the graph casts to FP16 only after the sinusoid.
    """
    if float_dtype not in FLOAT_DTYPES:
        raise DiffquantError(f"float dtype must be one of {sorted(FLOAT_DTYPES)}, got {float_dtype!r}")
    dtype = FLOAT_DTYPES[float_dtype]
    model = copy.deepcopy(denoiser).eval()
    model.prompts = None
    model.to(dtype)
    x, t, c = denoiser.example_inputs(batch)
    x = x.to(dtype)
    if c.is_floating_point():
        c = c.to(dtype)
    specs = denoiser.input_specs()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x, t, c),
            buf,
            dynamo=False,
            opset_version=TORCHSCRIPT_OPSET,
            input_names=[s.name for s in specs],
            output_names=list(denoiser.output_names),
            dynamic_axes={**{s.name: s.dynamic_axes for s in specs}, denoiser.output_names[0]: {0: "batch"}},
            do_constant_folding=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    try:
        proto = onnx.version_converter.convert_version(proto, OPSET)
    except Exception as e:  # the converter raises plain RuntimeErrors
        raise DiffquantError(f"could not upgrade the exported graph of {denoiser.name} to opset {OPSET}: {e}") from None
    meta = {"diffquant.model": denoiser.name, "diffquant.float_dtype": float_dtype, "diffquant.module_prefix": MODULE_PREFIX}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    return proto


def export_fp_onnx(denoiser: Denoiser, path: str | Path, float_dtype: str = "float32") -> Path:
    """Export the FP graph to ``path`` (atomically) and check it with the ONNX checker."""
    proto = fp_onnx_proto(denoiser, float_dtype)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)
