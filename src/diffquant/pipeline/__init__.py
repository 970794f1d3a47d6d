"""Passes that decide a QuantPlan, and recipes that compose them."""

from diffquant.pipeline import daq as _daq  # noqa: F401  (registers the passes)
from diffquant.pipeline import distill as _distill  # noqa: F401
from diffquant.pipeline import les as _les  # noqa: F401
from diffquant.pipeline import minmax as _minmax  # noqa: F401
from diffquant.pipeline import omq as _omq  # noqa: F401
from diffquant.pipeline import pts as _pts  # noqa: F401
from diffquant.pipeline import qua2sedimo as _qua2sedimo  # noqa: F401
from diffquant.pipeline import reconstruct as _reconstruct  # noqa: F401
from diffquant.pipeline import smoothquant as _smoothquant  # noqa: F401
from diffquant.pipeline import split as _split  # noqa: F401
from diffquant.pipeline import tcr as _tcr  # noqa: F401
from diffquant.pipeline.recipes import Recipe, available_recipes, decide_targets, load_recipe, quantize
from diffquant.pipeline.registry import PASSES, register_pass

__all__ = ["PASSES", "Recipe", "available_recipes", "decide_targets", "load_recipe", "quantize", "register_pass"]
