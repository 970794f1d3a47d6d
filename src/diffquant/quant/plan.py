"""The QuantPlan: every quantization decision, as plain data (JSON + a safetensors file).

Both the fake-quant torch model (`apply_plan`) and the exported ONNX graph are built from one
plan; nothing else carries quantization decisions. Plans are versioned and replayable on a
fresh FP model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffquant._digest import weights_digest
from diffquant._groups import group_index
from diffquant._io import atomic_path, write_json
from diffquant.errors import DiffquantError
from diffquant.quant.fake import round_scale
from diffquant.quant.format import QuantFormat

__all__ = ["PLAN_VERSION", "STATES", "LayerPlan", "QuantPlan", "input_multiplier", "pts_at", "reduce_range", "weights_digest"]

PLAN_VERSION = 1
STATES = ("float", "calibrating", "frozen", "exported")


def pts_at(k: torch.Tensor | None, group: int) -> torch.Tensor | None:
    """One timestep group's power-of-two exponents from ``<layer>.act_pts`` ([C] or [G, C])."""
    if k is None:
        return None
    return k.float() if k.dim() == 1 else k[group if len(k) > 1 else 0].float()


def input_multiplier(smooth: torch.Tensor | None, k: torch.Tensor | None) -> torch.Tensor | None:
    """The one per-input-channel factor before an activation quantizer: the smoothing vector
    times 2^k of power-of-two scaling (None: neither). Fake-quant and the graph both use it."""
    if k is None:
        return None if smooth is None else smooth.float()
    return torch.exp2(k) if smooth is None else torch.exp2(k) * smooth.float()


@dataclass
class LayerPlan:
    """The decision for one Conv2d / Linear: formats (None: that side stays FP), which targeting
    rule decided it, the layers sharing its input tensor, and free-form notes for the report."""

    name: str
    op: str
    rule: str
    weight: QuantFormat | None = None
    act: QuantFormat | None = None
    input_group: str = ""
    notes: list[str] = field(default_factory=list)
    split: int = 0  # > 0: the input is a channel concat [h, skip]; h has ``split`` channels and
    # each half gets its own activation scale (``act_scale`` for h, ``act_scale_split`` for skip)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "rule": self.rule,
            "weight": self.weight.to_dict() if self.weight else None,
            "act": self.act.to_dict() if self.act else None,
            "input_group": self.input_group,
            "notes": list(self.notes),
            "split": self.split,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerPlan:
        return cls(
            name=d["name"],
            op=d["op"],
            rule=d["rule"],
            weight=QuantFormat.from_dict(d["weight"]) if d.get("weight") else None,
            act=QuantFormat.from_dict(d["act"]) if d.get("act") else None,
            input_group=d.get("input_group", ""),
            notes=list(d.get("notes", [])),
            split=int(d.get("split", 0)),
        )


@dataclass
class QuantPlan:
    """Per-layer decisions plus their tensors.

    Tensors are keyed ``<layer>.weight_scale`` (per output channel, or [out, blocks]),
    ``<layer>.act_scale`` (scalar, or one per timestep group; with a shortcut split also
    ``<layer>.act_scale_split`` for the second half), optionally ``<layer>.act_smooth`` (a
    per-input-channel multiplier applied before the activation quantizer: equivalent scaling,
    whose inverse is already folded into ``<layer>.weight``), optionally ``<layer>.act_pts``
    (DMQ's power-of-two exponents k per input channel, [C] or [G, C]: the input is multiplied
    by 2^k before its per-tensor quantizer and the quantized weight by 2^-k), optionally ``<layer>.out_scale``
    (the layer's output range at 8 bits, same shape: the ``onnxruntime`` target requantizes conv
    outputs with it so QLinearConv fuses) and ``<layer>.weight`` (a replacement FP weight, e.g.
    after rounding reconstruction). All scales are already rounded to the export dtype.
    ``timestep_groups`` holds the ``[lo, hi)`` timestep range of each group (empty: one group).
    """

    model: str
    model_digest: str
    bits: str
    recipe: dict = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: str = "float"
    version: int = PLAN_VERSION
    skipped: dict[str, str] = field(default_factory=dict)
    timestep_groups: list[list[float]] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return max(1, len(self.timestep_groups))

    def group_of(self, t: float) -> int:
        """Index of the timestep group that ``t`` falls in."""
        return group_index(t, self.timestep_groups)

    def quantized_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers.values() if lp.weight or lp.act]

    def weight_scale(self, layer: str) -> torch.Tensor:
        return self.tensors[f"{layer}.weight_scale"]

    def act_scale(self, layer: str, group: int | None = None, half: int = 0) -> torch.Tensor:
        """All groups' activation scales of ``layer`` (scalar or [G]), or one group's; ``half=1``
        is the second half of a shortcut-split input."""
        s = self.tensors[f"{layer}.act_scale" + ("_split" if half else "")]
        return s if group is None else s.reshape(-1)[group if s.numel() > 1 else 0]

    def act_multiplier(self, layer: str, group: int = 0) -> torch.Tensor | None:
        """The one per-input-channel factor applied before ``layer``'s activation quantizer in
        ``group``: the smoothing vector times 2^k of power-of-two scaling (None: neither)."""
        return input_multiplier(self.tensors.get(f"{layer}.act_smooth"), self.pts_exponents(layer, group))

    def pts_exponents(self, layer: str, group: int = 0) -> torch.Tensor | None:
        """``layer``'s power-of-two exponents k per input channel in ``group`` (None: no PTS)."""
        return pts_at(self.tensors.get(f"{layer}.act_pts"), group)

    def out_scale(self, layer: str, group: int = 0) -> float | None:
        """The 8-bit output scale of ``layer`` in ``group``, if calibration recorded one."""
        s = self.tensors.get(f"{layer}.out_scale")
        return None if s is None else float(s.reshape(-1)[group if s.numel() > 1 else 0])

    def freeze(self) -> None:
        """Check every quantized layer has its tensors, then mark the plan frozen."""
        for lp in self.quantized_layers():
            if lp.weight and f"{lp.name}.weight_scale" not in self.tensors:
                raise DiffquantError(f"plan: layer {lp.name} has a weight format but no weight scale")
            if lp.act and f"{lp.name}.act_scale" not in self.tensors:
                raise DiffquantError(f"plan: layer {lp.name} has an activation format but no activation scale")
            if lp.act and lp.split and f"{lp.name}.act_scale_split" not in self.tensors:
                raise DiffquantError(f"plan: layer {lp.name} has a shortcut split but no scale for its second half")
            for key in ("act_scale", "act_scale_split") if lp.act else ():
                t = self.tensors.get(f"{lp.name}.{key}")
                if t is not None and self.n_groups > 1 and t.numel() != self.n_groups:
                    raise DiffquantError(f"plan: layer {lp.name} needs {self.n_groups} activation scales (one per timestep group)")
        self.state = "frozen"

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "state": self.state,
            "model": self.model,
            "model_digest": self.model_digest,
            "bits": self.bits,
            "recipe": self.recipe,
            "layers": [lp.to_dict() for lp in self.layers.values()],
            "skipped": self.skipped,
            "timestep_groups": self.timestep_groups,
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``plan.json`` and ``plan.safetensors`` into ``folder`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "plan.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp))
        write_json(folder / "plan.json", self.to_json())
        return folder / "plan.json"

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        """Load a plan from its folder or its ``plan.json``."""
        path = Path(path)
        folder = path.parent if path.name == "plan.json" else path
        jpath = folder / "plan.json"
        tpath = folder / "plan.safetensors"
        if not jpath.exists() or not tpath.exists():
            raise DiffquantError(f"no plan at {folder}: expected plan.json and plan.safetensors there")
        try:
            data = json.loads(jpath.read_text())
        except json.JSONDecodeError as e:
            raise DiffquantError(f"{jpath} is not valid JSON ({e}); re-run `diffquant quantize`") from None
        if data.get("version") != PLAN_VERSION:
            raise DiffquantError(f"{jpath}: plan version {data.get('version')} is not supported (expected {PLAN_VERSION})")
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError) as e:
            raise DiffquantError(f"{tpath} is not a readable safetensors file ({e}); re-run `diffquant quantize`") from None
        layers = {d["name"]: LayerPlan.from_dict(d) for d in data["layers"]}
        return cls(
            model=data["model"],
            model_digest=data["model_digest"],
            bits=data["bits"],
            recipe=data.get("recipe", {}),
            layers=layers,
            tensors=tensors,
            state=data["state"],
            version=data["version"],
            skipped=data.get("skipped", {}),
            timestep_groups=[list(map(float, r)) for r in data.get("timestep_groups", [])],
        )


def reduce_range(plan: QuantPlan) -> QuantPlan:
    """A copy of ``plan`` with every 8-bit per-channel weight grid re-quantized to 7 bits over the
    same clipping range (scale x 127/63, rounded as plan scales are), so S8 weight codes stay
    within +-64 and x86 CPUs without VNNI run them exactly (ONNX Runtime's ``reduce_range``).
    Activations, block formats and lower-bit grids are unchanged; parity is judged against it."""
    out = QuantPlan(plan.model, plan.model_digest, plan.bits, dict(plan.recipe), {}, dict(plan.tensors), plan.state,
                    plan.version, dict(plan.skipped), [list(g) for g in plan.timestep_groups])
    out.recipe["reduce_range"] = True
    for name, lp in plan.layers.items():
        w = lp.weight
        if w is not None and w.bits == 8 and w.granularity != "block":
            new = replace(w, bits=7)
            out.tensors[f"{name}.weight_scale"] = round_scale(plan.weight_scale(name) * (w.qmax / new.qmax))
            lp = replace(lp, weight=new, notes=[*lp.notes, "weights re-quantized to 7 bits (reduce_range)"])
        out.layers[name] = lp
    return out
