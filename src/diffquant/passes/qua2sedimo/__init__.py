"""Qua2SeDiMo's wing (Mills et al., AAAI 2025): data-free weight options (`options`), random
configurations and their scores (`sensitivity`), the ridge and GATv2 predictors (`predictor`,
`gnn`), the measurement that ties them (`search`), the budgeted searches (`budget`), the lowering
to deployable grids (`lowering`), the `qua2sedimo` pass (`assignment`), the analysis behind
`diffquant sensitivity` (`analyze`) and the explainable report (`report`).

Nothing is imported here: the pass registers itself when `diffquant.passes` imports `assignment`.
"""

__all__: list[str] = []
