"""diffquant: quantize diffusion denoisers after training, export deployable Q/DQ graphs for
TensorRT and ONNX Runtime, and prove that what is deployed computes what was calibrated."""

__version__ = "0.1.0"

__all__ = ["__version__", "export", "quantize"]


def __getattr__(name: str):
    # stage entry points, imported lazily so `import diffquant` stays light
    if name == "quantize":
        from diffquant.passes import quantize

        return quantize
    if name == "export":
        from diffquant.exporters import export

        return export
    raise AttributeError(f"module 'diffquant' has no attribute {name!r}")
