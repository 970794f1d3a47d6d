"""The `efficientdm` pass: EfficientDM's quantization-aware low-rank distillation, and MPQ-DM's
time-smoothed relation distillation (TRD) on top of it.

1. Every quantized conv / linear gets a LoRA adapter (rank ``rank``, A random, B zero) merged
   into its weight before the weight quantizer: W_q = Q(W + B A). The weight step sizes and the
   activation steps (TALSQ: one per timestep group of the plan, shared by the sites reading one
   tensor) are learned with them, LSQ-style (straight-through rounding).
2. Training distils the FP model into the quantized one along the **quantized model's own**
   sampler trajectories (DDIM, eta 0, guidance as the family samples): at every step the loss is
   the squared difference of the guidance-combined noise predictions (summed per sample,
   averaged over the batch); one optimizer step per denoising step (AdamW, linear decay; LoRA lr
   = the layer's mean weight step / ``lora_lr_div``, weight steps ``weight_lr``, activation
   steps ``act_lr``).
3. TRD (``trd: on``): the output of the last block in forward order (the UNet's last decoder
   block, the DiT's last transformer block) of both models, averaged over 2 consecutive steps,
   L2-normalized over channels; per sample the positions x positions cosine map, row softmax,
   and ``trd_weight`` * KL(P_fp || P_q), added every ``trd_every``-th step. The quantized
   features of the current step keep their graph (the previous step's are detached: its
   parameters have been updated since), so TRD's gradient reaches the LoRA and the step sizes.
   ``trd: detached`` detaches them as the released code does (TRD then changes no gradient).
4. Hardening: LoRA is merged (the plan gets W + B A as the layer's weight) and re-quantized with
   the learned step (rounded to FP16); the deployed graph has no LoRA branch.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffquant.errors import DiffquantError
from diffquant.models.sampler import make_scheduler
from diffquant.passes.context import PassContext
from diffquant.passes.observe.capture import out_tensor
from diffquant.passes.registry import register_pass
from diffquant.quant.fake import MIN_SCALE, round_scale
from diffquant.quant.modules import apply_plan, quant_modules
from diffquant.quant.plan import PassReport

__all__ = ["Distiller", "EfficientDMConfig", "LoRA", "efficientdm_pass", "last_block", "trd_loss"]

TRD_MODES = ("off", "detached", "on")


@dataclass
class EfficientDMConfig:
    """EfficientDM / MPQ-DM training settings. ``iters`` counts optimizer steps, one per
    denoising step (the papers: 16k on LDM-4; scale to the machine); ``steps`` is the sampler's
    steps per trajectory, ``batch_size`` the trajectories sampled together."""

    version: int = 1
    iters: int = 400
    steps: int = 20
    guidance: float | None = None
    batch_size: int = 8
    rank: int = 32
    lora_lr_div: float = 2500.0
    weight_lr: float = 1e-6
    act_lr: float = 5e-4
    weight_decay: float = 0.0
    trd: str = "off"
    trd_weight: float = 100.0
    trd_every: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trd not in TRD_MODES:
            raise ValueError(f"trd must be one of {TRD_MODES}, got {self.trd!r}")
        if self.iters < 0 or self.steps < 1 or self.batch_size < 1 or self.rank < 1 or self.trd_every < 1:
            raise ValueError("iters must be >= 0; steps, batch_size, rank and trd_every positive")


class LoRA(nn.Module):
    """A low-rank update B A of a weight (flattened to [out, in * kh * kw]); B starts at zero,
    so the adapted weight starts at W."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        out_f, in_f = weight.shape[0], weight[0].numel()
        r = min(rank, out_f, in_f)
        bound = 1.0 / math.sqrt(in_f)  # kaiming-uniform(a = sqrt 5), as LoRA initializes A
        self.a = nn.Parameter((torch.rand(r, in_f, generator=gen) * 2 - 1) * bound)
        self.b = nn.Parameter(torch.zeros(out_f, r))
        self.shape = tuple(weight.shape)

    def delta(self) -> torch.Tensor:
        return (self.b @ self.a).reshape(self.shape)


def trd_loss(f_fp: torch.Tensor, f_q: torch.Tensor, weight: float = 100.0) -> torch.Tensor:
    """MPQ-DM's relation loss between two feature maps [B, C, H, W] or token maps [B, L, C]:
    per sample the positions x positions cosine map, row softmax, weight * KL(P_fp || P_q)."""

    def relation(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(2).transpose(1, 2) if f.dim() == 4 else f
        f = F.normalize(f.float(), dim=-1)
        return f @ f.transpose(1, 2)

    log_p = F.log_softmax(relation(f_fp), dim=-1)
    log_q = F.log_softmax(relation(f_q), dim=-1)
    return weight * (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


@torch.no_grad()
def last_block(denoiser) -> str:
    """The block (of the family's block types) that runs last in a forward pass."""
    order: list[str] = []
    modules = dict(denoiser.model.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _a, _o, n=n: order.append(n)) for n, _ in denoiser.blocks()]
    try:
        denoiser(**denoiser.example_inputs(1))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise DiffquantError(f"{denoiser.name}: no block of types {denoiser.family.block_types} runs; TRD needs one")
    return order[-1]


class Distiller:
    """The quantized student (the fake-quant model with LoRA and trainable steps), the FP
    teacher, and their feature taps for TRD."""

    def __init__(self, ctx: PassContext, cfg: EfficientDMConfig) -> None:
        self.ctx, self.cfg, self.plan = ctx, cfg, ctx.plan
        self.fp = ctx.denoiser
        self.qd = copy.deepcopy(ctx.denoiser)
        apply_plan(self.qd.model, self.plan, check_digest=False, require_frozen=False)
        for p in self.qd.parameters():
            p.requires_grad_(requires_grad=False)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.qmods = quant_modules(self.qd.model)
        self.loras: dict[str, LoRA] = {}
        self.weight_steps: dict[str, nn.Parameter] = {}
        self.act_steps: dict[str, nn.Parameter] = {}  # input group -> shared step
        self.members: dict[str, list[str]] = {}  # input group -> its site keys
        for name, m in self.qmods.items():
            self._adapt(name, m)
        self.feats: dict[str, torch.Tensor] = {}
        self.tap = last_block(self.fp) if cfg.trd != "off" else ""
        self.handles = []
        if self.tap:
            for key, model in (("fp", self.fp), ("q", self.qd)):
                hook = lambda _m, _a, out, key=key: self.feats.__setitem__(key, out_tensor(out))  # noqa: E731
                self.handles.append(model.model.get_submodule(self.tap).register_forward_hook(hook))

    def _adapt(self, name: str, m) -> None:
        lp = self.plan.layers[name]
        m.set_ste(on=True)
        if m.weight_quantizer is not None:
            lora = self.loras[name] = LoRA(m.weight, self.cfg.rank, self.gen)
            self.weight_steps[name] = m.weight_quantizer.train_scale()
            m.weight_fn = lambda m=m, lora=lora: m.weight_quantizer(m.weight + lora.delta())
        for q, site in zip(m.input_quantizers, lp.input_sites, strict=True):
            g = site.group or str(site.key)
            if g in self.act_steps:
                q.set_scale(self.act_steps[g])
            else:
                self.act_steps[g] = q.train_scale()
            self.members.setdefault(g, []).append(str(site.key))

    def optimizer(self) -> torch.optim.Optimizer:
        groups = [
            {"params": [lo.a, lo.b], "lr": float(self.weight_steps[n].detach().mean()) / self.cfg.lora_lr_div}
            for n, lo in self.loras.items()
        ]
        groups += [
            {"params": list(self.weight_steps.values()), "lr": self.cfg.weight_lr},
            {"params": list(self.act_steps.values()), "lr": self.cfg.act_lr},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.cfg.weight_decay)

    def guided(self, model, inputs, *, use_cfg: bool, guidance: float) -> torch.Tensor:
        """``model``'s noise prediction, guidance-combined when the batch holds both CFG halves."""
        eps = model(**inputs).float()
        if not use_cfg:
            return eps
        e_c, e_u = eps.chunk(2)
        return e_u + guidance * (e_c - e_u)

    def trd_term(self, prev: dict | None) -> torch.Tensor | None:
        """TRD on this step's and the previous step's features (None without a previous step)."""
        if prev is None:
            return None
        cur_q = self.feats["q"].detach() if self.cfg.trd == "detached" else self.feats["q"]
        f_fp = (prev["fp"] + self.feats["fp"]) / 2
        f_q = (prev["q"] + cur_q) / 2
        return trd_loss(f_fp, f_q, self.cfg.trd_weight)

    def close(self) -> None:
        """Remove the feature hooks (the FP teacher is the caller's model)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def harden(self) -> None:
        """Merge LoRA into the plan's weights and write the learned steps (rounded to FP16)."""
        for name, lora in self.loras.items():
            m = self.qmods[name]
            self.plan.weights[name] = (m.weight.detach() + lora.delta().detach()).float().clone()
            self.plan.layers[name].weight_site.scale = round_scale(
                self.weight_steps[name].detach().clamp(min=MIN_SCALE)
            )
        sites = self.plan.sites
        for g, step in self.act_steps.items():
            value = round_scale(step.detach().clamp(min=MIN_SCALE))
            for key in self.members[g]:
                sites[key].scale = value.clone()


def _trajectory_batch(d, cfg: EfficientDMConfig, gen: torch.Generator, *, use_cfg: bool) -> tuple[torch.Tensor, dict]:
    """Starting noise and conditioning of ``cfg.batch_size`` trajectories with random prompts."""
    n_prompts = max(1, d.null_id)
    ids = torch.randint(0, n_prompts, (cfg.batch_size,), generator=gen)
    noise = torch.randn(cfg.batch_size, *d.sample_shape, generator=gen)
    cond = d.encode(ids)
    if use_cfg:
        uncond = d.encode(torch.full_like(ids, d.null_id))
        cond = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    return noise, cond


def _train(dist: Distiller, report: PassReport) -> None:
    """One optimizer step per denoising step along the student's own trajectories."""
    cfg, d = dist.cfg, dist.fp
    guidance = d.family.default_guidance if cfg.guidance is None else cfg.guidance
    use_cfg = d.family.guidance == "cfg" and guidance > 1.0
    flow = d.family.sampler == "flow"
    opt = dist.optimizer()
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / max(1, cfg.iters)))
    steps = [*dist.weight_steps.values(), *dist.act_steps.values()]
    it, window = 0, {"mse": [], "trd": []}
    bar = tqdm(total=cfg.iters, desc="efficientdm", disable=not dist.ctx.progress)
    while it < cfg.iters:
        noise, cond = _trajectory_batch(d, cfg, dist.gen, use_cfg=use_cfg)
        sched = make_scheduler(d, cfg.steps)
        x, prev = noise, None
        for i, t in enumerate(sched.timesteps):
            if it >= cfg.iters:
                break
            inputs = d.step_inputs(torch.cat([x, x]) if use_cfg else x, float(t), cond, guidance)
            with torch.no_grad():
                e_fp = dist.guided(d, inputs, use_cfg=use_cfg, guidance=guidance)
            e_q = dist.guided(dist.qd, inputs, use_cfg=use_cfg, guidance=guidance)
            loss = (e_q - e_fp).pow(2).reshape(len(e_q), -1).sum(dim=1).mean()
            window["mse"].append(float(loss.detach()))
            trd = dist.trd_term(prev) if dist.tap and i % cfg.trd_every == cfg.trd_every - 1 else None
            if trd is not None:
                window["trd"].append(float(trd.detach()))
                loss = loss + trd
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
            with torch.no_grad():
                for p in steps:
                    p.clamp_(min=MIN_SCALE)
            if not math.isfinite(window["mse"][-1]):
                raise DiffquantError(
                    f"efficientdm: the distillation loss diverged at step {it}; lower the learning rates"
                )
            prev = {k: v.detach() for k, v in dist.feats.items()} if dist.tap else None
            x = (
                sched.step(e_q.detach(), t, x).prev_sample
                if flow
                else sched.step(e_q.detach(), t, x, eta=0.0).prev_sample
            )
            it += 1
            bar.update(1)
            if it % 50 == 0 or it == cfg.iters:
                report.rows.append([it, _mean(window["mse"]), _mean(window["trd"])])
                bar.set_postfix(mse=f"{report.rows[-1][1]:.4g}")
                window = {"mse": [], "trd": []}
    bar.close()


def _mean(v: list[float]) -> float | str:
    return sum(v) / len(v) if v else "-"


@register_pass("efficientdm", EfficientDMConfig)
def efficientdm_pass(ctx: PassContext, cfg: EfficientDMConfig) -> None:
    """Distil the FP model into the plan's quantized model with LoRA and learned steps, then
    merge and re-quantize (see the module docstring)."""
    for lp in ctx.plan.quantized_layers():
        if any(site.scale is None for key, site in lp.sites.items() if key != "output"):
            raise DiffquantError(
                f"efficientdm: layer {lp.name} has no scales yet; run a range pass (minmax) before efficientdm in the "
                "recipe"
            )
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    dist = Distiller(ctx, cfg)
    trd = {
        "off": "no TRD",
        "detached": "TRD detached (as released)",
        "on": f"TRD x {cfg.trd_weight:g} every {cfg.trd_every} steps",
    }[cfg.trd]
    report = PassReport(
        "efficientdm",
        f"Low-rank distillation ({cfg.iters} steps along {cfg.steps}-step trajectories of {cfg.batch_size}, LoRA "
        f"rank {cfg.rank}, {trd})",
        ["step", "noise MSE (mean over the last 50)", "TRD loss"],
    )
    ctx.plan.reports.append(report)
    try:
        if cfg.iters:
            _train(dist, report)
    finally:
        dist.close()
    dist.harden()
    report.notes.append(
        f"{len(dist.loras)} LoRA adapters merged, {len(dist.act_steps)} activation steps per timestep group learned; "
        f"{time.time() - t0:.0f} s"
    )
