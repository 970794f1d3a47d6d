"""FP ONNX export, Q/DQ lowering of a plan, and the TensorRT rules linter."""

from diffquant.exporters.export import ExportResult, export
from diffquant.exporters.lint import LintReport, Violation, lint, load_onnx
from diffquant.exporters.onnx_fp import export_fp_onnx, fp_onnx_proto
from diffquant.exporters.qdq import lower_plan

__all__ = ["ExportResult", "LintReport", "Violation", "export", "export_fp_onnx", "fp_onnx_proto", "lint", "load_onnx", "lower_plan"]
