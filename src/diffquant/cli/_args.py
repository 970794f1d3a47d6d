"""Argument types and groups shared by the commands: whole numbers with a floor, image sizes,
comma lists, the model and recipe groups, ``--set`` overrides, and options made from a settings
dataclass's fields (a backend's build settings: help, choices and floors in the field metadata)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from diffquant.errors import DiffquantError

__all__ = [
    "NONNEGATIVE",
    "POSITIVE",
    "Help",
    "add_config_arguments",
    "add_model",
    "add_recipe",
    "count",
    "csv",
    "load_model",
    "parse_overrides",
    "resolution",
]


class Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.default in ("", [])
        if not action.option_strings or "default" in text or no_default:
            return text
        return f"{text} (default: %(default)s)".strip()


def count(low: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``low`` (a bad value exits 2 with usage, before any work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: it must be at least {low}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


POSITIVE, NONNEGATIVE = count(1), count(0)


def resolution(text: str) -> tuple[int, int]:
    """argparse type: ``H`` or ``HxW`` in pixels."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected H or HxW in pixels, e.g. 512 or 768x512")
    h = int(parts[0])
    return (h, int(parts[1]) if len(parts) == 2 else h)


def csv(kind: type, allowed: tuple = ()) -> Callable[[str], list]:
    """argparse type: a comma list of ``kind`` values (from ``allowed`` if given)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {kind.__name__} values") from None
        bad = [v for v in values if allowed and v not in allowed]
        if not values or bad:
            of = f" of {', '.join(map(str, allowed))}" if allowed else ""
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list{of}")
        return values

    parse.__name__ = f"comma list of {kind.__name__}"
    return parse


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="builtin:digits-sd",
        help="builtin:NAME, a diffusers pipeline folder (model_index.json; SD 1.x/2.x, SDXL, PixArt, SD3, Flux, DiT, "
        "DDPM), a bare unet/ or transformer/ folder of an unconditional or class-conditional model, or a hub id "
        "(cache only)",
    )
    p.add_argument(
        "--prompts",
        default="",
        metavar="FILE",
        help="calibration prompts, one per line, encoded by the pipeline's own text encoders "
        "(default: ~128 shipped prompts)",
    )
    p.add_argument(
        "--resolution",
        default=None,
        type=resolution,
        metavar="H[xW]",
        help="image size in pixels (default: the pipeline's)",
    )


def load_model(a: argparse.Namespace):
    """The denoiser of ``--model``, read with ``--prompts`` and ``--resolution``."""
    from diffquant.jobs.run import RunConfig, load_run_model

    return load_run_model(RunConfig(model=a.model, prompts=a.prompts, resolution=a.resolution))


def add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe",
        default="minmax",
        help="a shipped recipe's name (list them: `diffquant recipes`) or a recipe file's path ending in .yaml",
    )
    p.add_argument("--bits", default=None, help="wNaK, e.g. w8a8, w4a8, w4a6 (default: the recipe's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PASS.OPTION=VALUE",
        help="override a pass option of the recipe, e.g. --set reconstruct.iters=2000 (repeatable)",
    )


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["reconstruct.iters=2000"]`` -> ``{"reconstruct": {"iters": 2000}}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        pass_name, dot, option = key.partition(".")
        if not eq or not dot or not pass_name or not option:
            raise DiffquantError(f"--set {item!r}: expected PASS.OPTION=VALUE, e.g. reconstruct.iters=2000")
        try:
            out.setdefault(pass_name, {})[option] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise DiffquantError(
                f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote strings, "
                "write lists as [1, 2]"
            ) from None
    return out


def add_config_arguments(group: argparse._ActionsContainer, cls: type, seen: set[str]) -> None:
    """One option per field of dataclass ``cls`` not in ``seen`` (``--field-name``, or the
    metadata's ``flag``), typed by the annotation, with the metadata's help, choices and floor."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in seen:
            continue
        seen.add(f.name)
        meta, tp = f.metadata, hints[f.name]
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": meta.get("help", "")}
        if tp is bool:
            kw["action"] = "store_true" if not f.default else argparse.BooleanOptionalAction
        else:
            kw["type"] = count(meta["min"]) if tp is int and "min" in meta else tp
            if "choices" in meta:
                kw["choices"] = list(meta["choices"])
        group.add_argument(flag, **kw)
