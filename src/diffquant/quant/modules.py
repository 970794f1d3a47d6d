"""Fake-quant Conv2d / Linear wrappers and `apply_plan`, which builds the fake-quant model.

The wrappers subclass the torch layers, so module and parameter names stay those of the FP
model (the plan and the ONNX graph refer to layers by these names).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.quant.fake import fake_quant
from diffquant.quant.format import QuantFormat
from diffquant.quant.plan import QuantPlan, input_multiplier, pts_at, weights_digest

__all__ = ["OUT_FORMAT", "QuantConv2d", "QuantLinear", "apply_plan", "quant_modules", "smooth_input"]

# layer outputs are requantized (onnxruntime target) per tensor on the 8-bit grid
OUT_FORMAT = QuantFormat(bits=8)


def smooth_input(x: torch.Tensor, multiplier: torch.Tensor, conv: bool) -> torch.Tensor:
    """Multiply a layer input per input channel (dim 1 of a conv input, the last dim of a
    linear one): the activation side of equivalent scaling."""
    shape = [1] * x.dim()
    shape[1 if conv else -1] = -1
    return x * multiplier.reshape(shape)


class _QuantMixin:
    """Input (activation) and weight fake-quant around the FP op. ``capture`` keeps the last
    quantized input so parity checks can compare it with the graph's DequantizeLinear output.

    Optional parts, all set from the plan: ``act_smooth`` multiplies the input per channel
    before its quantizer (equivalent scaling); ``act_pts`` (exponents k per input channel, [C]
    or [G, C]) multiplies it by 2^k there too and the quantized weight by 2^-k (DMQ's
    power-of-two scaling: a finer activation step for small channels); ``split`` > 0 quantizes input channels
    ``[:split]`` with ``act_scale`` and ``[split:]`` with ``act_scale_split`` (shortcut split).
    For training passes, ``ste`` passes rounding gradients straight through and ``weight_fn``
    (if set) supplies the quantized weight (AdaRound's soft rounding)."""

    weight_format: QuantFormat | None
    act_format: QuantFormat | None
    capture: bool
    captured: torch.Tensor | None

    def _init_quant(self, weight_format, act_format) -> None:
        self.weight_format = weight_format
        self.act_format = act_format
        self.register_buffer("weight_scale", torch.ones(self.weight.shape[0]))
        self.register_buffer("act_scale", torch.ones(()))
        self.act_scale_split: torch.Tensor | None = None
        self.act_smooth: torch.Tensor | None = None
        self.act_pts: torch.Tensor | None = None
        self.split = 0
        self.out_scale: torch.Tensor | None = None  # set: requantize the output (onnxruntime target)
        self.capture = False
        self.captured = None
        self.ste = False
        self.weight_fn = None

    def quant_weight(self) -> torch.Tensor:
        if self.weight_fn is not None:
            w = self.weight_fn()
        elif self.weight_format is None:
            w = self.weight
        else:
            w = fake_quant(self.weight, self.weight_scale, self.weight_format, ste=self.ste)
        k = self._pts()
        if k is not None:
            w = w * torch.exp2(-k).reshape([1, -1] + [1] * (w.dim() - 2))
        return w

    group: int = 0  # current timestep group (set by apply_plan's hook when the plan has several)

    def _pts(self) -> torch.Tensor | None:
        return pts_at(self.act_pts, self.group)

    def input_multiplier(self) -> torch.Tensor | None:
        """The per-input-channel factor before the activation quantizer (smoothing x 2^k)."""
        return input_multiplier(self.act_smooth, self._pts())

    def _at_group(self, s: torch.Tensor) -> torch.Tensor:
        """A scalar scale, or the current group's entry of a per-group one."""
        return s if s.dim() == 0 else s[self.group]

    def quant_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.out_scale is None else fake_quant(y, self._at_group(self.out_scale), OUT_FORMAT)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        mult = self.input_multiplier()
        if mult is not None:
            x = smooth_input(x, mult, isinstance(self, nn.Conv2d))
        if self.act_format is not None:
            if self.split:
                a = fake_quant(x[:, : self.split], self._at_group(self.act_scale), self.act_format, ste=self.ste)
                b = fake_quant(x[:, self.split :], self._at_group(self.act_scale_split), self.act_format, ste=self.ste)
                x = torch.cat([a, b], dim=1)
            else:
                x = fake_quant(x, self._at_group(self.act_scale), self.act_format, ste=self.ste)
        if self.capture:
            self.captured = x.detach()
        return x


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d with per-output-channel weight and per-tensor input fake-quant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_output(self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias))


class QuantLinear(_QuantMixin, nn.Linear):
    """nn.Linear with per-output-channel weight and per-tensor input fake-quant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


def _wrap(module: nn.Module, wf: QuantFormat | None, af: QuantFormat | None) -> nn.Module:
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._init_quant(wf, af)
    return new


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: QuantPlan, check_digest: bool = True, target: str = "tensorrt", require_frozen: bool = True) -> nn.Module:
    """Replace every quantized layer of ``model`` (in place) by its fake-quant wrapper, loaded
    with the plan's scales and any replacement weights. Returns ``model``.

    ``target="onnxruntime"`` also requantizes the outputs of quantized convs with the plan's
    8-bit output scales, as that target's graph does (so QLinearConv fuses).
    ``require_frozen=False`` lets passes build the fake-quant model of a plan being decided."""
    if require_frozen and plan.state not in ("frozen", "exported"):
        raise DiffquantError(f"plan for {plan.model} is {plan.state!r}, not frozen: finish `diffquant quantize` first")
    if check_digest and plan.model_digest != weights_digest(model):
        raise DiffquantError(
            f"plan was made for {plan.model} with weights {plan.model_digest}, but this model's weights "
            f"hash to {weights_digest(model)}: quantize this model again"
        )
    modules = dict(model.named_modules())
    for lp in plan.quantized_layers():
        if lp.name not in modules:
            raise DiffquantError(f"plan names layer {lp.name!r}, which this model does not have")
        q = _wrap(modules[lp.name], lp.weight, lp.act)
        with torch.no_grad():
            if f"{lp.name}.weight" in plan.tensors:
                q.weight.copy_(plan.tensors[f"{lp.name}.weight"])
            if lp.weight:
                q.weight_scale = plan.weight_scale(lp.name).float().clone()
            if lp.act:
                q.act_scale = plan.act_scale(lp.name).float().clone()
                if lp.split:
                    q.split = lp.split
                    q.act_scale_split = plan.act_scale(lp.name, half=1).float().clone()
            if f"{lp.name}.act_smooth" in plan.tensors:
                q.act_smooth = plan.tensors[f"{lp.name}.act_smooth"].float().clone()
            if f"{lp.name}.act_pts" in plan.tensors:
                q.act_pts = plan.tensors[f"{lp.name}.act_pts"].float().clone()
            if target == "onnxruntime" and lp.op == "conv" and lp.act and f"{lp.name}.out_scale" in plan.tensors:
                q.out_scale = plan.tensors[f"{lp.name}.out_scale"].float().clone()
        _set_submodule(model, lp.name, q)
    if plan.n_groups > 1:
        _install_group_hook(model, plan)
    return model


def _install_group_hook(model: nn.Module, plan: QuantPlan) -> None:
    """Before every forward, point each wrapper at the timestep group of the batch's timestep
    (the diffusers ``timestep`` argument); a batch mixing groups is refused. The wrappers are
    looked up on the module the hook runs on, so a deep copy of the model switches its own."""

    def hook(root: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise DiffquantError("a plan with timestep groups needs the timestep argument to pick activation scales")
        groups = {plan.group_of(float(v)) for v in torch.as_tensor(t).reshape(-1).tolist()}
        if len(groups) != 1:
            raise DiffquantError(f"one batch mixes timestep groups {sorted(groups)}; run each group's timesteps separately")
        g = groups.pop()
        for m in quant_modules(root).values():
            m.group = g

    old = getattr(model, "_diffquant_group_hook", None)
    if old is not None:
        old.remove()
    model._diffquant_group_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


def quant_modules(model: nn.Module) -> dict[str, _QuantMixin]:
    """Name -> fake-quant wrapper for every wrapped layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantMixin)}
