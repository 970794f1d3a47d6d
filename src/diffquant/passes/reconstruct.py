"""The `reconstruct` pass: BRECQ / AdaRound / LSQ output reconstruction, block by block.

For each unit (a ResBlock, a UNet transformer, a DiT block, or a single layer that no block
holds; or every layer alone with ``granularity: layer``), in forward order:
1. record the unit's inputs on calibration samples, from the fake-quant model decided so far
   (``inputs: quant``, BRECQ) or from the FP model (``inputs: fp``), and the FP unit's outputs;
2. train AdaRound rounding variables for every quantized weight in the unit (Adam ``lr``,
   regularizer ``round_weight`` with its temperature annealed ``b_start`` -> ``b_end`` after a
   ``warmup`` share of the iterations) together with LSQ step sizes for its activation
   quantizers (Adam ``act_lr``, straight-through rounding), minimising the output error
   (squared error summed over channels, averaged over positions) weighted per sample by a
   pluggable timestep weighting (``uniform``, ``linear``, DMQ's ``adaptive``); with
   ``quantize_acts: false`` the activations stay FP and only the weights are learned (DMQ);
3. harden: the plan gets the rounded weights (``<layer>.weight``, exactly on the grid) and the
   learned step sizes (rounded to FP16), and the fake-quant model uses them for later units.

Activation scales shared by layers of several units (the conditioning read by every
cross-attention) are learned in the first unit that reads them and frozen afterwards. With
timestep groups every batch is drawn from one group and trains that group's step sizes.
PAR (TCAQ-DM's progressively aligned reconstruction; ``par_rounds`` > 0): after the units are
reconstructed, new calibration trajectories are sampled with the fake-quant model (same prompts,
seeds and schedule as the calibration set, so they differ from it only by the quantized model's
drift) and every unit is reconstructed again on them, the targets coming from the FP model on the
same inputs; round k runs ``iters * par_decay^k`` iterations. A later round starts from the
rounding found so far: AdaRound's variables are set within ``PAR_MARGIN`` of the previous hard
decision on the weights the first round started from (not on the hardened weights, which would
only let a weight move up), and the activation steps continue from their learned values.

After each unit the decisions so far are checkpointed (``checkpoint_dir``, by default under the
cache folder, keyed by a hash of the plan, data and config), so a stopped run resumes at the
next unit when started again with the same settings; the checkpoint is removed at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffquant._io import atomic_path, write_json
from diffquant.calib_data.collect import collect, default_cache_dir
from diffquant.errors import DiffquantError
from diffquant.models.denoiser import Denoiser
from diffquant.passes.context import PassContext
from diffquant.passes.observe.capture import (
    capture_inputs,
    capture_output,
    out_tensor,
    per_sample_loss,
    pick_samples,
    select,
)
from diffquant.passes.observe.weighting import make_weighting
from diffquant.passes.registry import register_pass
from diffquant.quant.fake import MIN_SCALE, broadcast_scale, round_scale
from diffquant.quant.modules import SiteQuantizer, apply_plan, quant_modules
from diffquant.quant.plan import PassReport
from diffquant.quant.site import SiteKey

__all__ = ["AdaRound", "ReconstructConfig", "reconstruct_pass"]

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch
PAR_MARGIN = 0.01  # a PAR round's rounding variables start this far inside the previous decision (gradients stay alive)


@dataclass
class ReconstructConfig:
    """Reconstruction settings. ``iters`` is per unit: the papers use 20k on SD-size models;
    scale it with the model (the builtin digits models need far fewer)."""

    version: int = 1
    granularity: str = "block"
    inputs: str = "quant"
    iters: int = 1000
    batch_size: int = 32
    samples: int = 1024
    lr: float = 1e-3
    act_lr: float = 4e-5
    learn_act_scales: bool = True
    quantize_acts: bool = True  # false: weights only, activations stay FP while training (DMQ)
    round_weight: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    timestep_weighting: str = "uniform"
    checkpoint_dir: str = ""
    seed: int = 0
    par_rounds: int = 0  # TCAQ-DM's PAR: reconstruct again on the quantized model's own trajectories
    par_decay: float = 0.5  # round k runs iters * par_decay^k iterations

    def __post_init__(self) -> None:
        if self.granularity not in ("block", "layer"):
            raise ValueError(f"granularity must be 'block' or 'layer', got {self.granularity!r}")
        if self.inputs not in ("quant", "fp"):
            raise ValueError(f"inputs must be 'quant' (BRECQ) or 'fp', got {self.inputs!r}")
        if self.iters < 1 or self.batch_size < 1 or self.samples < 1:
            raise ValueError("iters, batch_size and samples must be positive")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a share of the iterations in [0, 1), got {self.warmup}")
        if self.par_rounds < 0 or not 0.0 < self.par_decay <= 1.0:
            raise ValueError(
                f"par_rounds must be >= 0 and par_decay in (0, 1], got {self.par_rounds}, {self.par_decay}"
            )


class AdaRound(nn.Module):
    """Learned rounding of one weight on its plan grid: W = s * clamp(floor(W/s) + h(V)), with
    h a rectified sigmoid initialised so that h(V) = W/s - floor(W/s) (the FP weight)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, fmt, start: torch.Tensor | None = None) -> None:
        """``start``: an earlier hard decision on this weight's grid (PAR): h(V) starts within
        ``PAR_MARGIN`` of it instead of at the FP fraction."""
        super().__init__()
        w = weight.detach().float()
        self.register_buffer("step", broadcast_scale(scale.float(), w, fmt).expand_as(w).clone())
        self.register_buffer("floor", torch.floor(w / self.step))
        rest = (w / self.step - self.floor).clamp(0.0, 1.0 - 1e-6)
        if start is not None:
            rest = (torch.round(start.detach().float() / self.step) - self.floor).clamp(PAR_MARGIN, 1.0 - PAR_MARGIN)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.qmin, self.qmax = fmt.qmin, fmt.qmax

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def soft(self) -> torch.Tensor:
        return torch.clamp(self.floor + self.h(), self.qmin, self.qmax) * self.step

    def hard(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.v >= 0).float(), self.qmin, self.qmax) * self.step

    def regularizer(self, b: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(b)).sum()


def _units(ctx: PassContext, granularity: str) -> list[tuple[str, list[str]]]:
    """(unit module name, its quantized layers), in forward order."""
    layers = [lp.name for lp in ctx.plan.quantized_layers()]
    if granularity == "layer":
        units = [(n, [n]) for n in layers]
    else:
        units, held = [], set()
        for block, _ in ctx.denoiser.blocks():
            members = [n for n in layers if n.startswith(block + ".")]
            if members:
                units.append((block, members))
                held.update(members)
        units += [(n, [n]) for n in layers if n not in held]
    order: list[str] = []
    modules = dict(ctx.denoiser.model.named_modules())
    handles = [
        modules[u].register_forward_pre_hook(lambda _m, _a, u=u: order.append(u) if u not in order else None)
        for u, _ in units
    ]
    try:
        with torch.no_grad():
            ctx.denoiser(**ctx.calib.at(ctx.calib.timesteps[0], 2))
    finally:
        for h in handles:
            h.remove()
    rank = {u: i for i, u in enumerate(order)}
    return sorted((u for u in units if u[0] in rank), key=lambda u: rank[u[0]])


def _quantizer(qmods: dict, key: str) -> SiteQuantizer:
    """The fake-quant model's quantizer of site ``key``."""
    sk = SiteKey.parse(key)
    m = qmods[sk.module]
    return m.weight_quantizer if sk.role == "weight" else m.input_quantizers[sk.index]


def _ckpt_key(ctx: PassContext, cfg: ReconstructConfig) -> str:
    h = hashlib.sha256()
    plan = ctx.plan.to_json()
    for k in ("state", "reports", "bits"):  # reports and notes hold wall times: not part of the decisions
        plan.pop(k, None)
    for lp in plan["layers"]:
        lp.pop("notes", None)
    h.update(
        json.dumps(
            {"plan": plan, "cfg": asdict(cfg), "calib": ctx.calib.folder.name}, sort_keys=True, default=str
        ).encode()
    )
    tensors = ctx.plan.tensors()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _restore(plan, qmods: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put checkpointed tensors (``<layer>.weight``, ``<site>.scale``) into the plan and make
    the fake-quant wrappers use them."""
    for key, value in tensors.items():
        owner, _, attr = key.rpartition(".")
        if attr == "weight":
            plan.weights[owner] = value.clone()
            with torch.no_grad():
                qmods[owner].weight.data.copy_(value)
        else:
            plan.sites[owner].scale = value.clone()
            _quantizer(qmods, owner).set_scale(value.float().clone())


@dataclass
class _Unit:
    name: str
    layers: list[str]
    act_groups: dict[str, list[str]]  # input groups this unit learns -> all their member site keys
    base: dict[str, torch.Tensor] | None = None  # PAR: the first round's starting weights


@register_pass("reconstruct", ReconstructConfig)
def reconstruct_pass(ctx: PassContext, cfg: ReconstructConfig) -> None:
    """Reconstruct every unit in forward order, then the PAR rounds (see the module docstring)."""
    for lp in ctx.plan.quantized_layers():
        if any(site.scale is None for key, site in lp.sites.items() if key != "output"):
            raise DiffquantError(
                f"reconstruct: layer {lp.name} has no scales yet; run a range pass (minmax) before reconstruct in the "
                "recipe"
            )
    base = {lp.name: ctx.weight(lp.name).detach().float().clone() for lp in ctx.plan.quantized_layers() if lp.weight}
    _reconstruct_round(
        ctx, cfg, f"Reconstruction ({cfg.iters} iterations per unit, {cfg.granularity}s, inputs {cfg.inputs})", None
    )
    for k in range(1, cfg.par_rounds + 1):
        t0 = time.time()
        calib = collect(
            _fake_quant_copy(ctx), ctx.calib.config, cache_dir=ctx.calib.folder.parent, progress=ctx.progress
        )  # a calibration set, cached beside the FP one
        rcfg = dataclasses.replace(cfg, iters=max(1, round(cfg.iters * cfg.par_decay**k)), par_rounds=0)
        _reconstruct_round(
            dataclasses.replace(ctx, calib=calib),
            rcfg,
            f"PAR round {k} of {cfg.par_rounds} ({rcfg.iters} iterations per unit) on "
            f"{len(calib)} inputs from the fake-quant model's own trajectories (collected in {time.time() - t0:.0f} s)",
            base,
        )


def _reconstruct_round(
    ctx: PassContext, cfg: ReconstructConfig, title: str, base: dict[str, torch.Tensor] | None
) -> None:
    """One pass over the units on ``ctx.calib``; ``base``: the weights the first round started
    from (a PAR round starts its rounding from the plan's current decision on them)."""
    key = _ckpt_key(ctx, cfg)
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else default_cache_dir().parent / "reconstruct" / key[:16]
    done = _checkpointed(ckpt, key)
    torch.manual_seed(cfg.seed)
    qd, qmods = _student(ctx, cfg)
    units = _units(ctx, cfg.granularity)
    data = pick_samples(ctx, cfg.samples)
    groups = _act_groups(ctx, units) if cfg.learn_act_scales and cfg.quantize_acts else {}
    if done:
        tqdm.write(f"reconstruct: resuming from {ckpt}: {len(done)}/{len(units)} units done")
    report = PassReport("reconstruct", title, ["unit", "layers", "output loss before", "after", "s"])
    ctx.plan.reports.append(report)
    for i, (unit, names) in enumerate(tqdm(units, desc="reconstruct", disable=not ctx.progress)):
        if unit in done:
            _restore(ctx.plan, qmods, load_file(str(ckpt / f"{i:03d}.safetensors")))
            for n in names:
                ctx.plan.layers[n].notes.append(f"reconstructed in unit {unit}: restored from checkpoint {ckpt}")
            report.rows.append([unit, len(names), "checkpoint", "checkpoint", 0])
            continue
        t0 = time.time()
        job = _Unit(unit, names, groups.get(unit, {}), base)
        before, after, touched = _UnitTrainer(ctx, cfg, qd, qmods, job, data).run()
        for n in names:
            note = f"reconstructed in unit {unit}: output loss {before:.4g} -> {after:.4g} ({time.time() - t0:.0f} s)"
            ctx.plan.layers[n].notes.append(note)
        report.rows.append([unit, len(names), before, after, round(time.time() - t0, 1)])
        ckpt.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt / f"{i:03d}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in touched.items()}, str(tmp))
        done.append(unit)
        write_json(ckpt / "state.json", {"key": key, "done": done})
    if ckpt.exists() and not cfg.checkpoint_dir:
        shutil.rmtree(ckpt, ignore_errors=True)


def _checkpointed(ckpt: Path, key: str) -> list[str]:
    """The units a stopped run of the same settings finished (none without a checkpoint)."""
    if not (ckpt / "state.json").exists():
        return []
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("key") != key:
        raise DiffquantError(
            f"{ckpt} holds a reconstruction checkpoint of other settings; delete it or choose another checkpoint_dir"
        )
    return list(state["done"])


def _student(ctx: PassContext, cfg: ReconstructConfig) -> tuple[Denoiser, dict]:
    """The fake-quant model being trained and its quantized modules (activations left FP for a
    weights-only reconstruction)."""
    qd = _fake_quant_copy(ctx)
    qmods = quant_modules(qd.model)
    if not cfg.quantize_acts:
        for m in qmods.values():
            for q in m.input_quantizers:
                q.enabled = False
            m.output_quantizer = None
    return qd, qmods


def _act_groups(ctx: PassContext, units: list[tuple[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
    """Unit -> the input groups it learns (lead site key -> member site keys). Each input group
    (sites reading one tensor) is learned by the first unit holding a member and shared with every
    member."""
    members: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for unit, names in units:
        for n in names:
            for site in ctx.plan.layers[n].input_sites:
                g = site.group or str(site.key)
                members.setdefault(g, []).append(str(site.key))
                owner.setdefault(g, unit)
    out: dict[str, dict[str, list[str]]] = {}
    for g, mems in members.items():
        out.setdefault(owner[g], {})[g] = mems
    return out


def _fake_quant_copy(ctx: PassContext) -> Denoiser:
    qd = copy.deepcopy(ctx.denoiser)
    apply_plan(qd.model, ctx.plan, check_digest=False, require_frozen=False)
    for p in qd.parameters():
        p.requires_grad_(requires_grad=False)
    return qd


class _UnitTrainer:
    """One unit's reconstruction: its recorded inputs (from the fake-quant model so far, or FP)
    and the FP unit's outputs, AdaRound variables for its weights and LSQ steps for the input
    groups it learns, the training loop, and the hardening of what was learned into the plan
    and the fake-quant model."""

    def __init__(self, ctx: PassContext, cfg: ReconstructConfig, qd: Denoiser, qmods: dict, job: _Unit, data) -> None:
        self.ctx, self.cfg, self.qmods, self.job, self.plan = ctx, cfg, qmods, job, ctx.plan
        fp = ctx.denoiser
        src = qd if cfg.inputs == "quant" else fp
        self.stored = capture_inputs(src, src.model.get_submodule(job.name), data)
        self.target = capture_output(fp, fp.model.get_submodule(job.name), data)
        self.q_unit = qd.model.get_submodule(job.name)
        self.tl = torch.tensor(data[1])
        self.weighting = make_weighting(cfg.timestep_weighting, sorted(set(data[1])))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        in_group = [torch.tensor([self.plan.group_of(t) == g for t in data[1]]) for g in range(self.plan.n_groups)]
        by_group = [torch.nonzero(mask).reshape(-1) for mask in in_group]
        self.by_group = [(g, idx) for g, idx in enumerate(by_group) if len(idx)]
        self.rounders: dict[str, AdaRound] = {}
        self.act_params: dict[str, nn.Parameter] = {}

    def run(self) -> tuple[float, float, dict[str, torch.Tensor]]:
        """Train and harden; (loss before: nearest rounding, initial steps; after; the plan
        tensors changed, by file key)."""
        before = self.eval_loss()
        self._prepare()
        self._train()
        touched = self._harden()
        after = self.eval_loss()
        if not math.isfinite(after):
            raise DiffquantError(f"reconstruct: unit {self.job.name} diverged (loss {after}); lower lr / act_lr")
        return before, after, touched

    def loss(self, idx: torch.Tensor, g: int) -> torch.Tensor:
        """Per-sample output loss of samples ``idx`` (all of timestep group ``g``)."""
        for m in quant_modules(self.q_unit).values():
            m.set_group(g)
        args, kwargs = select(self.stored, idx)
        return per_sample_loss(out_tensor(self.q_unit(*args, **kwargs)), self.target[idx])

    def eval_loss(self) -> float:
        with torch.no_grad():
            tot = 0.0
            for g, idx in self.by_group:
                for s in range(0, len(idx), 256):
                    tot += float(self.loss(idx[s : s + 256], g).sum())
            return tot / len(self.target)

    def _prepare(self) -> None:
        """AdaRound in front of every quantized weight of the unit (from the first round's
        weights in a PAR round), straight-through rounding, one trainable step per learned group."""
        job, qmods = self.job, self.qmods
        for name in job.layers:
            m, lp = qmods[name], self.plan.layers[name]
            if lp.weight:
                start = {} if job.base is None else {"start": m.weight}
                w = m.weight if job.base is None else job.base[name]
                self.rounders[name] = AdaRound(w, m.weight_scale, lp.weight, **start)
                m.weight_fn = self.rounders[name].soft
            m.set_ste(on=True)
        for g, mems in job.act_groups.items():
            self.act_params[g] = nn.Parameter(_quantizer(qmods, mems[0]).scale.detach().clone())
            for key in mems:
                if SiteKey.parse(key).module in job.layers:
                    _quantizer(qmods, key).set_scale(self.act_params[g])

    def _train(self) -> None:
        cfg = self.cfg
        rounding = [r.v for r in self.rounders.values()]
        opts = [torch.optim.Adam(rounding, lr=cfg.lr)] if rounding else []
        opts += [torch.optim.Adam(list(self.act_params.values()), lr=cfg.act_lr)] if self.act_params else []
        pbar = tqdm(range(cfg.iters), desc=self.job.name, leave=False, disable=not self.ctx.progress)
        for it in pbar:
            rec = self._step(it, opts)
            if it % 50 == 0:
                pbar.set_postfix(loss=f"{rec:.4g}")

    def _step(self, it: int, opts: list[torch.optim.Optimizer]) -> float:
        """One batch of one timestep group: weighted reconstruction loss plus AdaRound's
        regularizer after the warm-up (its temperature annealed); returns the reconstruction loss."""
        cfg = self.cfg
        g, pool = self.by_group[it % len(self.by_group)]
        idx = pool[torch.randint(0, len(pool), (min(cfg.batch_size, len(pool)),), generator=self.gen)]
        losses = self.loss(idx, g)
        rec = (self.weighting.weights(self.tl[idx]) * losses).mean()
        loss = rec
        warm = int(cfg.warmup * cfg.iters)
        if self.rounders and it >= warm:
            rel = (it - warm) / max(1, cfg.iters - warm)
            b = cfg.b_end + (cfg.b_start - cfg.b_end) * max(0.0, 1.0 - rel)
            loss = loss + cfg.round_weight * sum(r.regularizer(b) for r in self.rounders.values())
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        with torch.no_grad():
            for p in self.act_params.values():
                p.clamp_(min=MIN_SCALE)
        self.weighting.update(self.tl[idx], losses.detach())
        return rec.item()

    def _harden(self) -> dict[str, torch.Tensor]:
        """The rounded weights and the learned steps (FP16-rounded) into the plan and the
        fake-quant model; the plan tensors changed, by file key."""
        plan, qmods = self.plan, self.qmods
        for name in self.job.layers:
            m, lp = qmods[name], plan.layers[name]
            m.set_ste(on=False)
            m.weight_fn = None
            if lp.weight:
                hard = self.rounders[name].hard().detach()
                with torch.no_grad():
                    m.weight.data.copy_(hard)
                plan.weights[name] = hard.clone()
        touched = {f"{k}.weight": plan.weights[k] for k in self.rounders}
        for g, param in self.act_params.items():
            value = round_scale(param.detach().clone())
            for key in self.job.act_groups[g]:
                site = plan.sites[key]
                site.scale = value.reshape(site.scale.shape).clone()
                _quantizer(qmods, key).set_scale(value.clone())
                touched[f"{key}.scale"] = site.scale
        return touched
