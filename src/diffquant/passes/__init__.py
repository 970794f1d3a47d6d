"""Passes that decide a QuantPlan, and recipes that compose them.

Each pass is one module that registers itself (`register_pass`); adding a pass is one file and
one import line below. Passes import the shared tools in `observe` (and a paper's wing, such as
`qua2sedimo`), never each other.
"""

from diffquant.passes import daq as _daq  # noqa: F401  (importing a pass module registers it)
from diffquant.passes import efficientdm as _efficientdm  # noqa: F401
from diffquant.passes import les as _les  # noqa: F401
from diffquant.passes import minmax as _minmax  # noqa: F401
from diffquant.passes import omq as _omq  # noqa: F401
from diffquant.passes import pts as _pts  # noqa: F401
from diffquant.passes import reconstruct as _reconstruct  # noqa: F401
from diffquant.passes import shortcut_split as _shortcut_split  # noqa: F401
from diffquant.passes import smoothquant as _smoothquant  # noqa: F401
from diffquant.passes import tcr as _tcr  # noqa: F401
from diffquant.passes.qua2sedimo import assignment as _qua2sedimo  # noqa: F401
from diffquant.passes.recipes import Recipe, available_recipes, decide_targets, load_recipe, quantize
from diffquant.passes.registry import PASSES, register_pass

__all__ = ["PASSES", "Recipe", "available_recipes", "decide_targets", "load_recipe", "quantize", "register_pass"]
