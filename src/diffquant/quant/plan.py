"""The QuantPlan: every quantization decision, as plain data (JSON + a safetensors file).

Both the fake-quant torch model (`apply_plan`) and the exported ONNX graph are built from one
plan; nothing else carries quantization decisions. A plan is a set of typed quantizer sites
(see `diffquant.quant.site`), grouped by the conv/linear layer they belong to, plus replacement
weights and the passes' reports. Plans are versioned and replayable on a fresh FP model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffquant._check import check_value, read_json
from diffquant._digest import weights_digest
from diffquant._groups import group_index
from diffquant._io import atomic_path, write_json
from diffquant.errors import DiffquantError
from diffquant.quant.fake import round_scale
from diffquant.quant.format import PerAxis, PerTensor, QuantFormat
from diffquant.quant.site import Site, SiteKey, input_multiplier, pts_at

__all__ = [
    "OUT_FORMAT",
    "PLAN_VERSION",
    "STATES",
    "BitsSummary",
    "LayerPlan",
    "PassReport",
    "QuantPlan",
    "input_multiplier",
    "pts_at",
    "reduce_range",
    "weights_digest",
]

PLAN_VERSION = 2
STATES = ("float", "calibrating", "frozen", "exported")
# layer outputs are requantized (onnxruntime target) per tensor on the 8-bit grid
OUT_FORMAT = QuantFormat(bits=8, granularity=PerTensor())
SCALE_BITS = 16  # scales are stored (and deployed) as FP16


@dataclass
class LayerPlan:
    """The decision for one Conv2d / Linear: its quantizer sites by local key (``weight``,
    ``input``, ``input#1`` for a shortcut split's second half, ``output``; a missing weight or
    input site means that side stays FP), the targeting rule that decided it, and notes."""

    name: str
    op: str
    rule: str
    sites: dict[str, Site] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    split: int = 0  # > 0: the input is a channel concat [h, skip]; h has ``split`` channels
    weight_numel: int = 0

    @classmethod
    def new(
        cls,
        name: str,
        op: str,
        rule: str,
        weight: QuantFormat | None,
        act: QuantFormat | None,
        weight_numel: int = 0,
        notes: list[str] | None = None,
    ) -> LayerPlan:
        """A layer with a weight site and / or an input site (plus its output site)."""
        lp = cls(name=name, op=op, rule=rule, notes=list(notes or []), weight_numel=weight_numel)
        if weight is not None:
            lp.sites["weight"] = Site(SiteKey(name, "weight"), weight)
        if act is not None:
            lp.sites["input"] = Site(SiteKey(name, "input"), act)
            lp.sites["output"] = Site(SiteKey(name, "output"), OUT_FORMAT)
        return lp

    @property
    def weight_site(self) -> Site | None:
        return self.sites.get("weight")

    @property
    def input_sites(self) -> list[Site]:
        """The activation quantizers of the input: none, one, or one per half of a split."""
        return [s for k in ("input", "input#1") if (s := self.sites.get(k)) is not None]

    @property
    def output_site(self) -> Site | None:
        return self.sites.get("output")

    @property
    def weight(self) -> QuantFormat | None:
        s = self.weight_site
        return None if s is None else s.format

    @property
    def act(self) -> QuantFormat | None:
        s = self.sites.get("input")
        return None if s is None else s.format

    @property
    def input_group(self) -> str:
        """The layer whose input site leads the tensor this layer reads (itself if none)."""
        s = self.sites.get("input")
        return self.name if s is None else s.lead_layer

    def set_split(self, channels: int) -> None:
        """Quantize input channels ``[:channels]`` and ``[channels:]`` separately."""
        if "input" not in self.sites:
            raise DiffquantError(f"layer {self.name}: only an activation-quantized input can be split")
        self.split = channels
        self.sites["input#1"] = Site(SiteKey(self.name, "input", 1), self.sites["input"].format)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "rule": self.rule,
            "split": self.split,
            "weight_numel": self.weight_numel,
            "notes": list(self.notes),
            "sites": [s.to_dict() for s in self.sites.values()],
        }

    @classmethod
    def from_dict(cls, d: dict, tensors: dict[str, torch.Tensor]) -> LayerPlan:
        sites = [Site.from_dict(s, tensors) for s in d.get("sites", [])]
        return cls(
            name=d["name"],
            op=d["op"],
            rule=d["rule"],
            sites={s.key.local: s for s in sites},
            notes=list(d.get("notes", [])),
            split=int(d.get("split", 0)),
            weight_numel=int(d.get("weight_numel", 0)),
        )


@dataclass
class PassReport:
    """A table a pass leaves for the evaluation to render (one row per layer, unit or group)."""

    pass_name: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        lines = [
            f"### {self.title} (`{self.pass_name}`)",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {
            "pass": self.pass_name,
            "title": self.title,
            "columns": list(self.columns),
            "rows": [list(r) for r in self.rows],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PassReport:
        return cls(
            d["pass"], d["title"], list(d["columns"]), [list(r) for r in d.get("rows", [])], list(d.get("notes", []))
        )


@dataclass(frozen=True)
class BitsSummary:
    """What a plan's weights cost, derived from its sites: the average grid width over all
    quantized weight elements, and the same with the FP16 scales counted; the activation widths."""

    request: str
    weight_bits: float
    weight_bits_with_scales: float
    act_bits: tuple[int, ...]

    def __str__(self) -> str:
        acts = "/".join(map(str, self.act_bits)) or "16"
        with_scales = f"{self.weight_bits_with_scales:.2f} weight bits with scales"
        return f"w{self.weight_bits:.2f}a{acts} ({with_scales}; asked {self.request})"

    def to_dict(self) -> dict:
        return {
            "request": self.request,
            "weight_bits": round(self.weight_bits, 4),
            "weight_bits_with_scales": round(self.weight_bits_with_scales, 4),
            "act_bits": list(self.act_bits),
        }


@dataclass
class QuantPlan:
    """Per-layer quantizer sites, replacement weights and the passes' reports.

    ``request`` is the bit string asked for (``w4a8``); `bits` summarizes what the sites hold.
    ``weights`` maps a layer to a replacement FP weight (equivalent scaling folded in, rounding
    reconstruction). ``operands`` holds sites that are not a conv/linear's (matmul operands).
    ``timestep_groups`` holds the ``[lo, hi)`` timestep range of each group (empty: one group).
    """

    model: str
    model_digest: str
    request: str
    recipe: dict = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    operands: dict[str, Site] = field(default_factory=dict)
    reports: list[PassReport] = field(default_factory=list)
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

    @property
    def sites(self) -> dict[str, Site]:
        """Every site by its key string: the layers' and the operands'."""
        out = {str(s.key): s for lp in self.layers.values() for s in lp.sites.values()}
        out.update(self.operands)
        return out

    def quantized_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers.values() if lp.weight or lp.act]

    def weight_scale(self, layer: str) -> torch.Tensor:
        return self.layers[layer].weight_site.scale

    def act_scale(self, layer: str, group: int | None = None, half: int = 0) -> torch.Tensor:
        """All groups' activation steps of ``layer`` ([G]), or one group's; ``half=1`` is the
        second half of a shortcut-split input."""
        site = self.layers[layer].input_sites[half]
        return site.scale if group is None else site.step(group)

    def act_multiplier(self, layer: str, group: int = 0) -> torch.Tensor | None:
        """The per-input-channel factor before ``layer``'s activation quantizer in ``group``:
        the smoothing vector times 2^k of power-of-two scaling (None: neither)."""
        s = self.layers[layer].sites.get("input")
        return None if s is None else s.input_multiplier(group)

    def pts_exponents(self, layer: str, group: int = 0) -> torch.Tensor | None:
        """``layer``'s power-of-two exponents k per input channel in ``group`` (None: no PTS)."""
        s = self.layers[layer].sites.get("input")
        return None if s is None else pts_at(s.pts, group)

    def out_scale(self, layer: str, group: int = 0) -> float | None:
        """The 8-bit output step of ``layer`` in ``group``, if calibration recorded one."""
        s = self.layers[layer].output_site
        return None if s is None or s.scale is None else float(s.step(group))

    @property
    def bits(self) -> BitsSummary:
        """Average weight bits over the quantized weight elements (and with the FP16 scales)."""
        n = grid = extra = 0.0
        acts: set[int] = set()
        for lp in self.quantized_layers():
            ws = lp.weight_site
            if ws is not None and lp.weight_numel:
                per_row = lp.weight_numel / len(ws.format.bits) if ws.format.mixed else 0
                grid += (
                    sum(b * per_row for b in ws.format.bits) if ws.format.mixed else ws.format.bits * lp.weight_numel
                )
                n += lp.weight_numel
                extra += SCALE_BITS * (ws.scale.numel() if ws.scale is not None else 1)
            acts.update(s.format.max_bits for s in lp.input_sites)
        return BitsSummary(
            self.request, grid / n if n else 16.0, (grid + extra) / n if n else 16.0, tuple(sorted(acts))
        )

    def freeze(self) -> None:
        """Check every site has its tensors, then mark the plan frozen."""
        self._check_sites()
        self.state = "frozen"

    def _check_sites(self) -> None:
        """Every weight / input site has its scale; activation scales and PTS exponents have one
        row per timestep group."""
        for lp in self.quantized_layers():
            for site in lp.input_sites:
                if site.pts is not None and site.pts.shape[0] != self.n_groups:
                    raise DiffquantError(
                        f"plan: site {site.key} has PTS exponents for {site.pts.shape[0]} timestep groups, the plan "
                        f"has {self.n_groups}"
                    )
            for key, site in lp.sites.items():
                if key == "output":
                    continue
                what = "weight" if key == "weight" else "activation"
                if site.scale is None:
                    raise DiffquantError(
                        f"plan: layer {lp.name} has a{'n' if what[0] == 'a' else ''} {what} format but no {what} "
                        f"scale ({site.key})"
                    )
                if what == "activation" and site.scale.numel() != self.n_groups:
                    raise DiffquantError(
                        f"plan: layer {lp.name} needs {self.n_groups} activation scales (one per timestep group), has "
                        f"{site.scale.numel()}"
                    )
            if lp.split and "input#1" not in lp.sites:
                raise DiffquantError(f"plan: layer {lp.name} has a shortcut split but no site for its second half")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the plan by its file key: ``<site key>.<tensor>`` and ``<layer>.weight``."""
        out = {f"{name}.weight": w for name, w in self.weights.items()}
        for s in self.sites.values():
            out.update(s.tensors())
        return out

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "state": self.state,
            "model": self.model,
            "model_digest": self.model_digest,
            "request": self.request,
            "bits": self.bits.to_dict(),
            "recipe": self.recipe,
            "layers": [lp.to_dict() for lp in self.layers.values()],
            "operands": [s.to_dict() for s in self.operands.values()],
            "reports": [r.to_dict() for r in self.reports],
            "skipped": self.skipped,
            "timestep_groups": self.timestep_groups,
            "tensors": {k: list(v.shape) for k, v in sorted(self.tensors().items())},
        }

    @classmethod
    def from_json(cls, data: dict, tensors: dict[str, torch.Tensor]) -> QuantPlan:
        layers = {d["name"]: LayerPlan.from_dict(d, tensors) for d in data["layers"]}
        operands = {d["key"]: Site.from_dict(d, tensors) for d in data.get("operands", [])}
        return cls(
            model=data["model"],
            model_digest=data["model_digest"],
            request=data["request"],
            recipe=data.get("recipe", {}),
            layers=layers,
            weights={k[: -len(".weight")]: v for k, v in tensors.items() if k.endswith(".weight") and ":" not in k},
            operands=operands,
            reports=[PassReport.from_dict(r) for r in data.get("reports", [])],
            state=data["state"],
            version=data["version"],
            skipped=data.get("skipped", {}),
            timestep_groups=[list(map(float, r)) for r in data.get("timestep_groups", [])],
        )

    def copy(self) -> QuantPlan:
        """An independent copy (tensors cloned)."""
        return QuantPlan.from_json(
            json.loads(json.dumps(self.to_json())), {k: v.clone() for k, v in self.tensors().items()}
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``plan.json`` and ``plan.safetensors`` into ``folder`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "plan.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors().items()}, str(tmp))
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
        data = read_json(jpath, "re-run `diffquant quantize`", required=("version",))
        if data.get("version") != PLAN_VERSION:
            raise DiffquantError(
                f"{jpath}: plan version {data.get('version')} is not supported (expected {PLAN_VERSION}); re-run "
                "`diffquant quantize`"
            )
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError) as e:
            raise DiffquantError(
                f"{tpath} is not a readable safetensors file ({e}); re-run `diffquant quantize`"
            ) from None
        try:
            plan = cls.from_json(data, tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DiffquantError(
                f"{jpath}: malformed plan ({type(e).__name__}: {e}); re-run `diffquant quantize`"
            ) from None
        plan._check_loaded(data.get("tensors"), tensors, jpath)
        return plan

    def _check_loaded(self, index: dict | None, tensors: dict[str, torch.Tensor], jpath: Path) -> None:
        """A loaded plan is whole: frozen, every tensor plan.json lists present with its shape (a
        deleted scale or replacement weight, or a scale of another shape, is refused), every site complete."""
        again = "re-run `diffquant quantize`"
        if self.state not in ("frozen", "exported"):
            raise DiffquantError(f"{jpath}: the plan is {self.state!r}, not frozen; {again}")
        for key, shape in check_value(index or {}, dict[str, list], f"{jpath}: tensors", again).items():
            if key not in tensors:
                raise DiffquantError(f"{jpath}: tensor {key!r} is missing from plan.safetensors; {again}")
            if list(tensors[key].shape) != list(shape):
                raise DiffquantError(
                    f"{jpath}: tensor {key!r} has shape {list(tensors[key].shape)} in plan.safetensors, plan.json "
                    f"says {shape}; {again}"
                )
        try:
            self._check_sites()
        except DiffquantError as e:
            raise DiffquantError(f"{jpath}: {str(e).removeprefix('plan: ')}; {again}") from None


def reduce_range(plan: QuantPlan) -> QuantPlan:
    """A copy of ``plan`` with every 8-bit per-channel weight grid re-quantized to 7 bits over the
    same clipping range (scale x 127/63, rounded as plan scales are), so S8 weight codes stay
    within +-64 and x86 CPUs without VNNI run them exactly (ONNX Runtime's ``reduce_range``).
    Activations, block formats and lower-bit grids are unchanged; parity is judged against it."""
    out = plan.copy()
    out.recipe["reduce_range"] = True
    for lp in out.layers.values():
        ws = lp.weight_site
        if ws is not None and ws.format.bits == 8 and isinstance(ws.format.granularity, PerAxis):
            new = ws.format.with_bits(7)
            ws.scale = round_scale(ws.scale * (ws.format.qmax / new.qmax))
            ws.format = new
            lp.notes.append("weights re-quantized to 7 bits (reduce_range)")
    return out
