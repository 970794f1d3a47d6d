"""The floor below the passes: tools that observe the model and the plan, shared by several
passes and importing none of them: activation statistics (`activations`), range estimation
(`observers`), recording a module's calls (`capture`), timestep loss weightings (`weighting`),
the power-law test (`powerlaw`) and equivalent scaling (`scaling`)."""

__all__: list[str] = []
