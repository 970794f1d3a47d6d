"""The jobs behind the commands that join every room: `run` (calibrate, quantize, export, parity,
quality, report), `validate` (a run's graphs against their references), `sensitivity`
(Qua2SeDiMo's report) and `zoo` (train a builtin model and measure its card). The run job names no paper:
passes add what they have to show through their report hooks."""

__all__: list[str] = []
