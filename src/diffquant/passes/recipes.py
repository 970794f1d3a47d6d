"""Recipes: YAML files naming targeting rules and passes with their configs; `quantize()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffquant._check import check_value
from diffquant._groups import split_groups
from diffquant.calib_data import CalibSet, check_calib
from diffquant.errors import DiffquantError
from diffquant.models.denoiser import Denoiser
from diffquant.passes.context import PassContext
from diffquant.passes.registry import get_pass, make_config
from diffquant.quant.format import PerAxis, PerBlock, QuantFormat, parse_bits
from diffquant.quant.plan import LayerPlan, QuantPlan, weights_digest
from diffquant.quant.targeting import Rule, TargetDecision, resolve_targets, rule_to_dict, rules_from_dicts

__all__ = ["Recipe", "available_recipes", "decide_targets", "load_recipe", "quantize", "recipes_dir"]


def recipes_dir() -> Path:
    """The folder of the shipped recipes (the only place a bare recipe name resolves)."""
    return Path(str(resources.files("diffquant") / "recipes"))


def available_recipes() -> list[str]:
    """The shipped recipes' names."""
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


RECIPE_TYPES: dict[str, Any] = {
    "name": str,
    "version": int,
    "description": str,
    "bits": str,
    "targeting": list,
    "use_default_skip": bool,
    "default_skip_bits": str,
    "timestep_groups": int,
    "passes": list,
}
RECIPE_VERSION = 1


def _recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe by bare name (nothing outside the recipes folder), or a YAML path."""
    text = str(name_or_path)
    if Path(text).suffix in (".yaml", ".yml"):
        if not Path(text).is_file():
            raise DiffquantError(f"recipe file {text} does not exist")
        return Path(text)
    if text not in available_recipes():
        raise DiffquantError(
            f"unknown recipe {text!r}; available: {', '.join(available_recipes())} (a recipe file must be given as a "
            "path ending in .yaml)"
        )
    return recipes_dir() / f"{text}.yaml"


def _read_recipe(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DiffquantError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DiffquantError(f"{path}: a recipe must be a mapping of {sorted(RECIPE_TYPES)}")
    unknown = set(data) - set(RECIPE_TYPES)
    if unknown:
        raise DiffquantError(f"{path}: unknown recipe keys {sorted(unknown)}; allowed: {sorted(RECIPE_TYPES)}")
    data = {k: check_value(v, RECIPE_TYPES[k], f"{path}: {k}") for k, v in data.items()}
    if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
        raise DiffquantError(
            f"{path}: version {data['version']} is not a recipe version this diffquant reads ({RECIPE_VERSION})"
        )
    if data.get("timestep_groups", 1) < 1:
        raise DiffquantError(f"{path}: timestep_groups must be >= 1, got {data['timestep_groups']}")
    for key in ("bits", "default_skip_bits"):
        if data.get(key):
            _check_bits(data[key], f"{path}: {key}")
    return data


def _check_bits(text: str, where: str) -> None:
    try:
        parse_bits(text)
    except DiffquantError as e:
        raise DiffquantError(f"{where}: {e}") from None


def _passes(data: dict, path: Path, overrides: dict[str, dict]) -> list[tuple[str, Any]]:
    passes = []
    for i, p in enumerate(data.get("passes", [])):
        where = f"{path}: passes[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or set(p) - {"name", "config"}:
            raise DiffquantError(
                f"{where}: expected a mapping with a 'name' (a pass name) and an optional 'config' mapping, got {p!r}"
            )
        config = check_value(p.get("config") or {}, dict, f"{where}: config")
        passes.append((p["name"], make_config(p["name"], {**config, **overrides.pop(p["name"], {})}, where)))
    if overrides:
        raise DiffquantError(
            f"--set names passes that recipe {path.stem!r} does not run: {sorted(overrides)}; it runs "
            f"{[n for n, _ in passes]}"
        )
    return passes


def load_recipe(name_or_path: str | Path, overrides: dict[str, dict] | None = None) -> Recipe:
    """Load a recipe by name (one of the shipped recipes) or by a ``.yaml`` path; ``overrides``
    maps a pass name to option values that replace the recipe's. Every value is type-checked."""
    path = _recipe_path(name_or_path)
    data = _read_recipe(path)
    return Recipe(
        name=data.get("name", path.stem),
        bits=data.get("bits", "w8a8"),
        description=data.get("description", ""),
        version=data.get("version", RECIPE_VERSION),
        targeting=rules_from_dicts(data.get("targeting", []), str(path)),
        use_default_skip=data.get("use_default_skip", True),
        default_skip_bits=data.get("default_skip_bits", ""),
        timestep_groups=data.get("timestep_groups", 1),
        passes=_passes(data, path, dict(overrides or {})),
    )


def _rules(denoiser: Denoiser, recipe: Recipe, extra: list[Rule] | None) -> list[Rule]:
    rules = list(recipe.targeting)
    if recipe.use_default_skip and recipe.default_skip_bits:
        rules += [
            Rule(pattern=p, bits=recipe.default_skip_bits, name=f"default-{recipe.default_skip_bits} {p}")
            for p in denoiser.skip
        ]
    elif recipe.use_default_skip:
        rules += [Rule(pattern=p, quantize=False, name=f"default-skip {p}") for p in denoiser.skip]
    return rules + list(extra or [])


def decide_targets(denoiser: Denoiser, recipe: Recipe, extra: list[Rule] | None = None) -> dict[str, TargetDecision]:
    """Which rule hits each layer (what `diffquant plan` prints)."""
    return resolve_targets(denoiser.model, _rules(denoiser, recipe, extra))


def _decide_formats(plan: QuantPlan, denoiser: Denoiser, targets: dict, setting) -> None:
    """Each targeted layer's weight / activation formats into ``plan`` (a block format falls back
    to per-channel where the layer cannot take it; a block size no layer can take is refused)."""
    modules = dict(denoiser.model.named_modules())
    blocked, widths = 0, set()
    for name, dec in targets.items():
        layer_setting = parse_bits(dec.bits) if dec.bits else setting
        wf = layer_setting.weight if dec.weights else None
        af = layer_setting.act if dec.activations else None
        notes = [f"bits {dec.bits} from rule {dec.rule}"] if dec.bits else []
        weight = modules[name].weight
        if wf is not None and isinstance(wf.granularity, PerBlock):
            k = weight.shape[1]
            if dec.op == "linear":
                widths.add(k)
            if dec.op != "linear" or k % wf.granularity.size:
                why = (
                    "convolutions have no block format"
                    if dec.op != "linear"
                    else f"K = {k} is not a multiple of {wf.granularity.size}"
                )
                wf = QuantFormat(bits=wf.bits, granularity=PerAxis(0))
                notes.append(f"weights per output channel, not blocks: {why}")
            else:
                blocked += 1
        if wf or af:
            plan.layers[name] = LayerPlan.new(name, dec.op, dec.rule, wf, af, weight_numel=weight.numel(), notes=notes)
        else:
            plan.skipped[name] = dec.rule
    if isinstance(setting.weight.granularity, PerBlock) and plan.layers and not blocked:
        size = setting.weight.granularity.size
        raise DiffquantError(
            f"bits {setting.text}: block size {size} divides the input width of no quantized Linear of {denoiser.name} "
            f"(widths {sorted(widths) or 'none: no Linear is quantized'}); pick a block size that divides them, e.g. "
            "16 or 32"
        )


def quantize(
    denoiser: Denoiser,
    recipe: Recipe,
    calib: CalibSet,
    *,
    bits: str | None = None,
    extra_rules: list[Rule] | None = None,
    progress: bool = True,
    timestep_groups: int | None = None,
) -> QuantPlan:
    """Decide a frozen QuantPlan for ``denoiser`` by running ``recipe``'s passes on ``calib``;
    ``timestep_groups`` > 1 gives each contiguous group of timesteps its own activation scales
    (None: the recipe's default)."""
    timestep_groups = recipe.timestep_groups if timestep_groups is None else timestep_groups
    if not isinstance(timestep_groups, int) or timestep_groups < 1:
        raise DiffquantError(f"--timestep-groups must be a whole number >= 1, got {timestep_groups!r}")
    setting = parse_bits(bits or recipe.bits)
    check_calib(calib, denoiser)
    targets = decide_targets(denoiser, recipe, extra_rules)
    plan = QuantPlan(
        model=denoiser.name, model_digest=weights_digest(denoiser.model), request=setting.text, recipe=recipe.to_dict()
    )
    if timestep_groups > 1:
        try:
            plan.timestep_groups = split_groups(
                calib.timesteps, timestep_groups, denoiser.scheduler["num_train_timesteps"]
            )
        except ValueError as e:
            raise DiffquantError(f"--timestep-groups: {e}") from None
    _decide_formats(plan, denoiser, targets, setting)
    if not plan.layers:
        raise DiffquantError(f"recipe {recipe.name!r} targets no layer of {denoiser.name}; check its targeting rules")
    plan.state = "calibrating"
    ctx = PassContext(denoiser=denoiser, plan=plan, calib=calib, progress=progress)
    for name, cfg in recipe.passes:
        _, fn = get_pass(name)
        fn(ctx, cfg)
    plan.freeze()
    return plan
