"""The builtin models: their architectures and weights (`builtin`, `weights/`), the digits data
(`data`) and the seeded code that trains them (`train`, `ldm`). `models` loads them like any
pipeline; `diffquant zoo train` (the `jobs.zoo` job) retrains one and measures its card. Imports
torch, diffusers and transformers, nothing else of diffquant's rooms."""

__all__: list[str] = []
