"""Megatron-core tensor-parallel hosting of transformers targets (``target.backend=megatron``).

``parallelize.py`` swaps the projections of transformers' own model for megatron's parallel layers (one table
entry per family), ``parallel.py`` holds those layers and the process groups, ``adapter.py`` reads each rank's
shards from the checkpoint, ``backend.py`` is the ``TargetBackend``.
"""

from dspark.targets.megatron.backend import MegatronTarget

__all__ = ["MegatronTarget"]
