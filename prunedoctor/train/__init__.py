"""The Refill / RSST training loop behind ``prunedoctor reproduce``.

:func:`prunedoctor.train.loop.run_reproduction` runs or resumes a run;
:class:`prunedoctor.train.config.RunConfig` contains its settings. The modules import torch,
so the command-line interface imports them inside the command only.
"""

__all__: list[str] = []
