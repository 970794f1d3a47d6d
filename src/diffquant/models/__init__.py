"""Loading pipelines, the family adapters and the `Denoiser` they drive, named inputs, samplers,
and the builtin digits models."""
