"""The `diffquant` command: one subcommand per stage, grouped by what they act on
(`cli.quantize`: decide and export a plan; `cli.deploy`: build and run engines, torch-free;
`cli.analyze`: validate, explain, the builtin models). Bad input is one line, exit 2."""

from __future__ import annotations

import argparse
import functools
import signal
import sys

from diffquant.cli import analyze, deploy, quantize
from diffquant.cli._args import Help, parse_overrides
from diffquant.errors import DiffquantError

__all__ = ["build_parser", "main", "parse_overrides"]

DESCRIPTION = """Quantize diffusion denoisers after training, export deployable Q/DQ graphs, and prove parity.

The stages, each a command (`run` does the first three, then checks parity and quality):
  calibrate -> quantize -> export -> build -> generate / validate

  diffquant run --model builtin:digits-sd --recipe dmq --bits w4a8 --target onnxruntime --out runs/dmq
  diffquant build runs/dmq --out runs/dmq/engine                   # the whole pipeline: text encoders, denoiser, VAE
  diffquant generate runs/dmq/engine --prompt seven -n 16 --out seven.png
  diffquant sensitivity --model builtin:digits-dit --out runs/dit-sens  # Qua2SeDiMo's explainable report

`diffquant COMMAND --help` shows a command's options with their defaults."""


def build_parser() -> argparse.ArgumentParser:
    from diffquant import __version__

    ap = argparse.ArgumentParser(prog="diffquant", description=DESCRIPTION, formatter_class=Help)
    ap.add_argument("--version", action="version", version=f"diffquant {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the Python traceback of an error instead of one line")
    parser_class = functools.partial(argparse.ArgumentParser, formatter_class=Help)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=parser_class)
    for group in (quantize, deploy, analyze):
        group.add_parsers(sub)
    for p in sub.choices.values():
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the Python traceback of an error instead of one line",
        )
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every temp folder is cleaned up on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.fn(args)
    except DiffquantError as e:
        if args.debug:
            raise
        print(f"diffquant: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("diffquant: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("diffquant: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line, the traceback with --debug
        if args.debug:
            raise
        print(
            f"diffquant: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
