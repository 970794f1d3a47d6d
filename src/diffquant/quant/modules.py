"""Fake-quant Conv2d / Linear wrappers and `apply_plan`, which builds the fake-quant model.

The wrappers subclass the torch layers, so module and parameter names stay those of the FP
model (the plan and the ONNX graph refer to layers by these names). Each plan site becomes a
`SiteQuantizer` child holding that site's format and tensors as buffers (they move with the
model to any device).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.quant.attention import ProbsQuant, install_probs_hooks
from diffquant.quant.fake import fake_quant
from diffquant.quant.format import QuantFormat
from diffquant.quant.plan import OUT_FORMAT, LayerPlan, QuantPlan, weights_digest
from diffquant.quant.site import Site, SiteKey, input_multiplier, pts_at, step_at
from diffquant.targets import get_target

__all__ = [
    "OUT_FORMAT",
    "QuantConv2d",
    "QuantLinear",
    "SiteQuantizer",
    "apply_plan",
    "fake_quant_forms",
    "quant_modules",
    "smooth_input",
]


def smooth_input(x: torch.Tensor, multiplier: torch.Tensor, *, conv: bool) -> torch.Tensor:
    """Multiply a layer input per input channel (dim 1 of a conv input, the last dim of a
    linear one): the activation side of equivalent scaling."""
    shape = [1] * x.dim()
    shape[1 if conv else -1] = -1
    return x * multiplier.reshape(shape)


class SiteQuantizer(nn.Module):
    """One plan site in the fake-quant model: its format, its scale (a buffer, or a Parameter
    while a pass trains it), and for input sites the smoothing multiplier and PTS exponents.
    ``group`` picks the timestep group's step; ``ste`` passes rounding gradients straight
    through; ``enabled`` False lets values pass unquantized (weights-only training)."""

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.key: SiteKey = site.key
        self.format: QuantFormat = site.format
        self.register_buffer("scale", site.scale.float().clone() if site.scale is not None else torch.ones(1))
        self.register_buffer("multiplier", None if site.multiplier is None else site.multiplier.float().clone())
        self.register_buffer("pts", None if site.pts is None else site.pts.float().clone())
        self.group = 0
        self.ste = False
        self.enabled = True

    def set_scale(self, value: torch.Tensor) -> None:
        """Use ``value`` as the scale: a (possibly shared) Parameter while a pass trains it,
        a buffer otherwise."""
        self._parameters.pop("scale", None)
        self._buffers.pop("scale", None)
        if isinstance(value, nn.Parameter):
            self._parameters["scale"] = value
        else:
            self._buffers["scale"] = value

    def train_scale(self) -> nn.Parameter:
        """Turn the scale into a trainable Parameter (returned)."""
        p = nn.Parameter(self.scale.detach().clone())
        self.set_scale(p)
        return p

    def step(self) -> torch.Tensor:
        """The step in use: a weight site's whole scale, an activation site's current group's."""
        return step_at(self.scale, self.key.role, self.group)

    def exponents(self) -> torch.Tensor | None:
        return pts_at(self.pts, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.step(), self.format, ste=self.ste) if self.enabled else x

    def extra_repr(self) -> str:
        return f"{self.key}, bits={self.format.bits}"


class _QuantMixin:
    """Input (activation) and weight fake-quant around the FP op, from the layer's sites.
    ``capture`` keeps the last quantized input so parity checks can compare it with the
    graph's DequantizeLinear output.

    The input site's multiplier (equivalent scaling) and 2^k of its PTS exponents multiply the
    input per channel before its quantizer, and 2^-k the quantized weight (DMQ's power-of-two
    scaling). With two input sites (a shortcut split) channels ``[:split]`` and ``[split:]``
    are quantized separately. For training passes ``weight_fn`` (if set) supplies the
    quantized weight (AdaRound's soft rounding, LoRA-merged weights)."""

    weight_quantizer: SiteQuantizer | None
    input_quantizers: nn.ModuleList
    output_quantizer: SiteQuantizer | None
    capture: bool
    captured: torch.Tensor | None

    def _init_quant(self, lp: LayerPlan, *, with_output: bool) -> None:
        self.weight_quantizer = SiteQuantizer(lp.weight_site) if lp.weight_site is not None else None
        self.input_quantizers = nn.ModuleList([SiteQuantizer(s) for s in lp.input_sites])
        out = lp.output_site
        self.output_quantizer = (
            SiteQuantizer(out) if with_output and out is not None and out.scale is not None else None
        )
        self.split = lp.split
        self.capture = False
        self.captured = None
        self.weight_fn = None

    # read-only views used by evaluation code
    @property
    def weight_format(self) -> QuantFormat | None:
        return None if self.weight_quantizer is None else self.weight_quantizer.format

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.weight_quantizer.scale

    @property
    def act_format(self) -> QuantFormat | None:
        return self.input_quantizers[0].format if len(self.input_quantizers) else None

    def set_group(self, group: int) -> None:
        for q in self.site_quantizers():
            q.group = group

    def set_ste(self, *, on: bool) -> None:
        for q in self.site_quantizers():
            q.ste = on

    def site_quantizers(self) -> list[SiteQuantizer]:
        return [q for q in (self.weight_quantizer, *self.input_quantizers, self.output_quantizer) if q is not None]

    def quant_weight(self) -> torch.Tensor:
        if self.weight_fn is not None:
            w = self.weight_fn()
        elif self.weight_quantizer is None:
            w = self.weight
        else:
            w = self.weight_quantizer(self.weight)
        k = self._pts()
        if k is not None:
            w = w * torch.exp2(-k).reshape([1, -1] + [1] * (w.dim() - 2))
        return w

    def _pts(self) -> torch.Tensor | None:
        return self.input_quantizers[0].exponents() if len(self.input_quantizers) else None

    def input_multiplier(self) -> torch.Tensor | None:
        """The per-input-channel factor before the activation quantizer (smoothing x 2^k)."""
        if not len(self.input_quantizers):
            return None
        return input_multiplier(self.input_quantizers[0].multiplier, self._pts())

    def quant_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        mult = self.input_multiplier()
        if mult is not None:
            x = smooth_input(x, mult, conv=isinstance(self, nn.Conv2d))
        qs = self.input_quantizers
        if len(qs) == 2:
            x = torch.cat([qs[0](x[:, : self.split]), qs[1](x[:, self.split :])], dim=1)
        elif len(qs) == 1:
            x = qs[0](x)
        if self.capture:
            self.captured = x.detach()
        return x


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d with its plan sites' fake-quant on input, weight and (optionally) output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_output(self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias))


class QuantLinear(_QuantMixin, nn.Linear):
    """nn.Linear with its plan sites' fake-quant on input and weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


def _wrap(module: nn.Module, lp: LayerPlan, *, with_output: bool) -> nn.Module:
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._init_quant(lp, with_output=with_output)
    return new


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_plan(
    model: nn.Module,
    plan: QuantPlan,
    *,
    check_digest: bool = True,
    target: str = "tensorrt",
    require_frozen: bool = True,
    operands: bool = True,
) -> nn.Module:
    """Replace every quantized layer of ``model`` (in place) by its fake-quant wrapper, loaded
    with the plan's sites and any replacement weights. Returns ``model``.

    A ``target`` whose graphs requantize conv outputs (``onnxruntime``: so QLinearConv fuses) also
    requantizes the outputs of quantized convs with the plan's 8-bit output sites.
    ``require_frozen=False`` lets passes build the fake-quant model of a plan being decided.
    The plan's operand sites (attention probabilities, DAQ) are installed unless ``operands`` is
    False: no graph carries them, so the deployed form's fake-quant model leaves them out."""
    if require_frozen and plan.state not in ("frozen", "exported"):
        raise DiffquantError(f"plan for {plan.model} is {plan.state!r}, not frozen: finish `diffquant quantize` first")
    if check_digest and plan.model_digest != weights_digest(model):
        raise DiffquantError(
            f"plan was made for {plan.model} with weights {plan.model_digest}, but this model's weights "
            f"hash to {weights_digest(model)}: quantize this model again"
        )
    modules = dict(model.named_modules())
    requantize = get_target(target).requantize_conv_outputs
    for lp in plan.quantized_layers():
        if lp.name not in modules:
            raise DiffquantError(f"plan names layer {lp.name!r}, which this model does not have")
        q = _wrap(modules[lp.name], lp, with_output=requantize and lp.op == "conv" and lp.act is not None)
        if lp.name in plan.weights:
            with torch.no_grad():
                q.weight.copy_(plan.weights[lp.name])
        _set_submodule(model, lp.name, q)
    if operands and plan.operands:
        by_module: dict[str, list[Site]] = {}
        for site in sorted(plan.operands.values(), key=lambda x: (x.key.module, x.key.index)):
            by_module.setdefault(site.key.module, []).append(site)
        install_probs_hooks(model, {m: ProbsQuant([SiteQuantizer(x) for x in sites]) for m, sites in by_module.items()})
    if plan.n_groups > 1:
        _install_group_hook(model, plan)
    return model


def fake_quant_forms(denoiser: nn.Module, plan: QuantPlan, target: str = "tensorrt") -> tuple[nn.Module, nn.Module]:
    """Two fake-quant copies of ``denoiser`` (its ``.model`` wrapped): the research form (every
    site, DAQ's attention probabilities included) and the deployed form (what the graph computes,
    the one parity compares against). One object twice when the plan has no operand sites."""
    research = copy.deepcopy(denoiser)
    apply_plan(research.model, plan, target=target)
    if not plan.operands:
        return research, research
    deployed = copy.deepcopy(denoiser)
    apply_plan(deployed.model, plan, target=target, operands=False)
    return research, deployed


def _install_group_hook(model: nn.Module, plan: QuantPlan) -> None:
    """Before every forward, point each site quantizer at the timestep group of the batch's
    timestep (the diffusers ``timestep`` argument); a batch mixing groups is refused. The
    quantizers are looked up on the module the hook runs on, so a deep copy switches its own."""

    def hook(root: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise DiffquantError("a plan with timestep groups needs the timestep argument to pick activation scales")
        groups = {plan.group_of(float(v)) for v in torch.as_tensor(t).reshape(-1).tolist()}
        if len(groups) != 1:
            raise DiffquantError(
                f"one batch mixes timestep groups {sorted(groups)}; run each group's timesteps separately"
            )
        g = groups.pop()
        for m in [*quant_modules(root).values(), *(x for x in root.modules() if isinstance(x, ProbsQuant))]:
            m.set_group(g)

    old = getattr(model, "_diffquant_group_hook", None)
    if old is not None:
        old.remove()
    model._diffquant_group_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


def quant_modules(model: nn.Module) -> dict[str, _QuantMixin]:
    """Name -> fake-quant wrapper for every wrapped layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantMixin)}
