"""What the CPU that runs an engine can do with signed 8-bit weights, decided on that machine.

ONNX Runtime's x86 integer kernels multiply U8 activations by S8 weights. Without VNNI (AVX2,
AVX-512 without VNNI) they sum each adjacent pair of u8*s8 products in saturating int16
(``vpmaddubsw``): 255 * (|w0| + |w1|) must stay within 32767, which holds for every weight
code within +-64 (7-bit grids) and fails for full-range 8-bit codes. VNNI (``vpdpbusd``:
AVX-512 VNNI, AVX-VNNI) and AMX accumulate in int32 and never saturate; Arm kernels widen each
product before adding (and dot-product cores accumulate in int32), so they never saturate either.
Torch-free.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["PAIRSUM_SAFE_CODE", "CpuInfo", "cpu_info", "full_range", "pairsum_int16", "saturates"]

PAIRSUM_SAFE_CODE = 64  # 2 * 255 * 64 = 32640 <= 32767: any pairing of such codes is exact
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
_ARM_DOT = ("asimddp", "i8mm")
_SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp", "i8mm", "sve")


@dataclass
class CpuInfo:
    """The CPU model, architecture and the instruction-set flags that decide integer kernels."""

    model: str
    arch: str
    flags: list[str] = field(default_factory=list)

    @property
    def int32_dot(self) -> bool:
        """True where u8*s8 products never pass through a saturating int16 pair sum: x86 with
        VNNI or AMX, and any Arm CPU."""
        return self.arch.lower() in ("aarch64", "arm64") or any(f in self.flags for f in _VNNI + _ARM_DOT)

    @property
    def bf16(self) -> bool:
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def to_dict(self) -> dict:
        return {**asdict(self), "int32_dot": self.int32_dot}

    def describe(self) -> str:
        return f"{self.model} ({self.arch}; {' '.join(self.flags) or 'no VNNI/AVX-512 flags'})"


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU, from /proc/cpuinfo where there is one (Linux), else `platform`."""
    model, flags = platform.processor() or platform.machine(), set()
    path = Path(cpuinfo)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    elif platform.system() == "Darwin" and platform.machine() == "arm64":
        flags.add("asimddp")  # every Apple Silicon core has the dot-product instructions
    return CpuInfo(model=model, arch=platform.machine(), flags=[f for f in _SHOWN if f in flags])


def pairsum_int16(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Emulate a non-VNNI x86 U8S8 dot product along the last axis: adjacent u8*s8 products
    summed in pairs with int16 saturation, then widened to int32 and summed. ``a`` uint8 [..., K],
    ``w`` int8 [N, K] -> int32 [..., N]."""
    a32, w32 = a.astype(np.int32), w.astype(np.int32)
    k = a32.shape[-1]
    if k % 2:
        a32 = np.concatenate([a32, np.zeros(a32.shape[:-1] + (1,), np.int32)], axis=-1)
        w32 = np.concatenate([w32, np.zeros(w32.shape[:-1] + (1,), np.int32)], axis=-1)
    prod = a32[..., None, :] * w32  # [..., N, K]
    pairs = prod[..., 0::2] + prod[..., 1::2]
    return np.clip(pairs, -32768, 32767).sum(axis=-1, dtype=np.int32)


def full_range(codes: np.ndarray) -> bool:
    """Whether S8 weight ``codes`` leave +-64, so that some U8 input saturates an int16 pair sum."""
    return int(np.abs(codes.astype(np.int32)).max(initial=0)) > PAIRSUM_SAFE_CODE


def saturates(codes: np.ndarray, cpu: CpuInfo) -> bool:
    """Whether S8 weight ``codes`` can saturate on ``cpu`` for some U8 input."""
    return not cpu.int32_dot and full_range(codes)
