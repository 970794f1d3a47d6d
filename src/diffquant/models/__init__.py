"""Loading denoisers, the `Denoiser` adapter, samplers, and the builtin digits models."""
