"""Every fact about a lowering target, in one place: how the exporter writes a plan for it, what
the linter allows in its graphs, how the fake-quant model mirrors it, what float type the pipeline
parts take, how its deployed form is evaluated, and which backend builds its graphs by default.

A target is the graph form (`diffquant export --target`), not the machine: ``tensorrt`` graphs
(FP16, S8 Q/DQ) are built by TensorRT on a GPU or by OpenVINO on a CPU; ``onnxruntime`` graphs
(FP32, U8 activations, requantized conv outputs) are what ONNX Runtime's CPU kernels fuse.
Torch-free and onnx-free (numpy only): the linter, `build` and the runtime read it on edge devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffquant.errors import DiffquantError

__all__ = ["TARGETS", "Target", "get_target"]


@dataclass(frozen=True)
class Target:
    """How a target wants the plan's decisions written and checked.

    ``act_dtype`` / ``act_zero_point`` and ``weight_dtype`` / ``weight_zero_point`` each encode
    the same symmetric grid (U8 with zero point 128 is S8 shifted). ``q_types`` are the quantized
    ONNX types its graphs may hold; ``strict_placement``: an activation DequantizeLinear may feed
    only Conv / MatMul / Gemm / Add (what TensorRT fuses); ``int4_blocks``: the INT4 block sizes
    along K it takes (empty: any power of two >= 16, MatMulNBits'). ``parts_fp16``: the pipeline
    parts are FP16 where their activations fit; ``fused_kernels``: its deployed form is evaluated
    with ONNX Runtime's fused integer kernels (else plain Q/DQ semantics); ``backend``: what
    `build --backend auto` uses; ``rounding``: what moves its outputs off the fake-quant model's."""

    name: str
    summary: str
    float_dtype: str
    act_dtype: type
    act_zero_point: int
    weight_dtype: type
    weight_zero_point: int
    requantize_conv_outputs: bool
    q_types: tuple[str, ...]
    strict_placement: bool
    int4_blocks: tuple[int, ...]
    parts_fp16: bool
    fused_kernels: bool
    backend: str
    rounding: str

    def symmetric_zero_point(self, q_type: str) -> int:
        """The zero point that makes ``q_type`` (an ONNX type name) encode the symmetric grid."""
        return 128 if q_type == "UINT8" else 0

    def int4_block_problem(self, block: int) -> str:
        """Why an INT4 weight's block size is not legal here ("" when it is)."""
        if self.int4_blocks and block not in self.int4_blocks:
            return f"INT4 weight needs block_size {' or '.join(map(str, self.int4_blocks))} along K, got {block}"
        if block < 16 or block & (block - 1):
            return f"MatMulNBits needs a power-of-two block_size >= 16 along K, got {block}"
        return ""


TARGETS: dict[str, Target] = {
    "tensorrt": Target(
        name="tensorrt",
        summary="FP16 graph, S8 Q/DQ (TensorRT on a GPU; OpenVINO on a CPU)",
        float_dtype="float16",
        act_dtype=np.int8,
        act_zero_point=0,
        weight_dtype=np.int8,
        weight_zero_point=0,
        requantize_conv_outputs=False,
        q_types=("INT8", "INT4"),
        strict_placement=True,
        int4_blocks=(64, 128),
        parts_fp16=True,
        fused_kernels=False,
        backend="tensorrt",
        rounding="FP16 rounding",
    ),
    "onnxruntime": Target(
        name="onnxruntime",
        summary="FP32 graph, U8 activations and S8 weights that ONNX Runtime fuses (CPU)",
        float_dtype="float32",
        act_dtype=np.uint8,
        act_zero_point=128,
        weight_dtype=np.int8,
        weight_zero_point=0,
        requantize_conv_outputs=True,
        q_types=("INT8", "UINT8", "INT4"),
        strict_placement=False,
        int4_blocks=(),
        parts_fp16=False,
        fused_kernels=True,
        backend="onnxruntime",
        rounding="last-bit kernel differences",
    ),
}


def get_target(name: str) -> Target:
    """The target called ``name``, or one error listing the known ones."""
    if name not in TARGETS:
        raise DiffquantError(f"unknown target {name!r}; available: {', '.join(TARGETS)}")
    return TARGETS[name]
