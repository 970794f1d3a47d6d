"""Recipes: YAML files naming targeting rules and passes with their configs; `quantize()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffquant._groups import split_groups
from diffquant.calib_data import CalibSet
from diffquant.errors import DiffquantError
from diffquant.models.denoiser import Denoiser
from diffquant.pipeline.context import PassContext
from diffquant.pipeline.registry import get_pass, make_config
from diffquant.quant.format import PerAxis, PerBlock, QuantFormat, parse_bits
from diffquant.quant.plan import LayerPlan, QuantPlan, weights_digest
from diffquant.quant.targeting import Rule, TargetDecision, resolve_targets, rule_to_dict, rules_from_dicts

__all__ = ["Recipe", "available_recipes", "decide_targets", "load_recipe", "quantize", "recipes_dir"]

RECIPE_KEYS = {"name", "version", "description", "bits", "targeting", "use_default_skip", "default_skip_bits", "timestep_groups", "passes"}


def recipes_dir() -> Path:
    return Path(str(resources.files("diffquant") / "recipes"))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


@dataclass
class Recipe:
    """A resolved recipe: default bits, targeting rules, and (pass name, config) in order.
    ``use_default_skip`` keeps the family's sensitive layers (first / last layer, time
    embedding) in FP, or with ``default_skip_bits`` (``w8a8``) quantizes them at those bits;
    ``timestep_groups`` is the default number of activation-step groups (TALSQ)."""

    name: str
    bits: str = "w8a8"
    description: str = ""
    version: int = 1
    targeting: list[Rule] = field(default_factory=list)
    use_default_skip: bool = True
    default_skip_bits: str = ""
    timestep_groups: int = 1
    passes: list[tuple[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "bits": self.bits,
            "use_default_skip": self.use_default_skip,
            "default_skip_bits": self.default_skip_bits,
            "timestep_groups": self.timestep_groups,
            "targeting": [rule_to_dict(r) for r in self.targeting],
            "passes": [{"name": n, "config": asdict(c)} for n, c in self.passes],
        }


def load_recipe(name_or_path: str | Path, overrides: dict[str, dict] | None = None) -> Recipe:
    """Load a recipe by name (from the shipped recipes) or path; ``overrides`` maps a pass name
    to option values that replace the recipe's."""
    path = Path(name_or_path)
    if not path.suffix:
        path = recipes_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise DiffquantError(f"unknown recipe {str(name_or_path)!r}; available: {', '.join(available_recipes())}")
    if not path.exists():
        raise DiffquantError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DiffquantError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise DiffquantError(f"{path}: a recipe must be a mapping")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise DiffquantError(f"{path}: unknown recipe keys {sorted(unknown)}; allowed: {sorted(RECIPE_KEYS)}")
    overrides = dict(overrides or {})
    passes = []
    for i, p in enumerate(data.get("passes", [])):
        if not isinstance(p, dict) or "name" not in p:
            raise DiffquantError(f"{path}: passes[{i}] must be a mapping with a 'name'")
        values = {**(p.get("config") or {}), **overrides.pop(p["name"], {})}
        passes.append((p["name"], make_config(p["name"], values, f"{path} passes[{i}]")))
    if overrides:
        raise DiffquantError(f"overrides name passes that recipe {path.stem!r} does not run: {sorted(overrides)}")
    recipe = Recipe(
        name=str(data.get("name", path.stem)),
        bits=str(data.get("bits", "w8a8")),
        description=str(data.get("description", "")),
        version=int(data.get("version", 1)),
        targeting=rules_from_dicts(data.get("targeting", []), str(path)),
        use_default_skip=bool(data.get("use_default_skip", True)),
        default_skip_bits=str(data.get("default_skip_bits", "")),
        timestep_groups=int(data.get("timestep_groups", 1)),
        passes=passes,
    )
    parse_bits(recipe.bits)
    if recipe.default_skip_bits:
        parse_bits(recipe.default_skip_bits)
    if recipe.timestep_groups < 1:
        raise DiffquantError(f"{path}: timestep_groups must be >= 1, got {recipe.timestep_groups}")
    return recipe


def _rules(denoiser: Denoiser, recipe: Recipe, extra: list[Rule] | None) -> list[Rule]:
    rules = list(recipe.targeting)
    if recipe.use_default_skip and recipe.default_skip_bits:
        rules += [Rule(pattern=p, bits=recipe.default_skip_bits, name=f"default-{recipe.default_skip_bits} {p}") for p in denoiser.skip]
    elif recipe.use_default_skip:
        rules += [Rule(pattern=p, quantize=False, name=f"default-skip {p}") for p in denoiser.skip]
    return rules + list(extra or [])


def decide_targets(denoiser: Denoiser, recipe: Recipe, extra: list[Rule] | None = None) -> dict[str, TargetDecision]:
    """Which rule hits each layer (what `diffquant plan` prints)."""
    return resolve_targets(denoiser.model, _rules(denoiser, recipe, extra))


def quantize(
    denoiser: Denoiser,
    recipe: Recipe,
    calib: CalibSet,
    bits: str | None = None,
    extra_rules: list[Rule] | None = None,
    progress: bool = True,
    timestep_groups: int | None = None,
) -> QuantPlan:
    """Decide a frozen QuantPlan for ``denoiser`` by running ``recipe``'s passes on ``calib``;
    ``timestep_groups`` > 1 gives each contiguous group of timesteps its own activation scales
    (None: the recipe's default)."""
    timestep_groups = recipe.timestep_groups if timestep_groups is None else timestep_groups
    setting = parse_bits(bits or recipe.bits)
    targets = decide_targets(denoiser, recipe, extra_rules)
    plan = QuantPlan(model=denoiser.name, model_digest=weights_digest(denoiser.model), request=setting.text, recipe=recipe.to_dict())
    if timestep_groups > 1:
        try:
            plan.timestep_groups = split_groups(calib.timesteps, timestep_groups, denoiser.scheduler["num_train_timesteps"])
        except ValueError as e:
            raise DiffquantError(f"--timestep-groups: {e}") from None
    modules = dict(denoiser.model.named_modules())
    for name, dec in targets.items():
        layer_setting = parse_bits(dec.bits) if dec.bits else setting
        wf = layer_setting.weight if dec.weights else None
        af = layer_setting.act if dec.activations else None
        notes = [f"bits {dec.bits} from rule {dec.rule}"] if dec.bits else []
        weight = modules[name].weight
        if wf is not None and isinstance(wf.granularity, PerBlock):
            k = weight.shape[1]
            if dec.op != "linear" or k % wf.granularity.size:
                why = "convolutions have no block format" if dec.op != "linear" else f"K = {k} is not a multiple of {wf.granularity.size}"
                wf = QuantFormat(bits=wf.bits, granularity=PerAxis(0))
                notes.append(f"weights per output channel, not blocks: {why}")
        if wf or af:
            plan.layers[name] = LayerPlan.new(name, dec.op, dec.rule, wf, af, weight_numel=weight.numel(), notes=notes)
        else:
            plan.skipped[name] = dec.rule
    if not plan.layers:
        raise DiffquantError(f"recipe {recipe.name!r} targets no layer of {denoiser.name}; check its targeting rules")
    plan.state = "calibrating"
    ctx = PassContext(denoiser=denoiser, plan=plan, calib=calib, progress=progress)
    for name, cfg in recipe.passes:
        _, fn = get_pass(name)
        fn(ctx, cfg)
    plan.freeze()
    return plan
