"""FP ONNX export, Q/DQ lowering of a plan, and the rules linter.

Names are imported lazily so that the pure-ONNX linter (``diffquant.exporters.linter``) loads
without torch: `diffquant build` lints graphs on machines that only have the runtime.
"""

from importlib import import_module

__all__ = [
    "ExportResult",
    "LintReport",
    "PartsConfig",
    "Violation",
    "export",
    "export_fp_onnx",
    "export_parts",
    "fp_onnx_proto",
    "lint",
    "load_onnx",
    "lower_plan",
]

_WHERE = {
    "ExportResult": "writer",
    "export": "writer",
    "LintReport": "linter",
    "Violation": "linter",
    "lint": "linter",
    "load_onnx": "linter",
    "export_fp_onnx": "onnx_fp",
    "fp_onnx_proto": "onnx_fp",
    "lower_plan": "qdq",
    "PartsConfig": "parts",
    "export_parts": "parts",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"diffquant.exporters.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'diffquant.exporters' has no attribute {name!r}")
