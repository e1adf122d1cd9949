"""The ``pipeline`` backend: the target's decoder layers partitioned over pipeline stages.

``stages.py`` holds the stage modules (embedding, one HF decoder layer, final norm, each loading only its own
tensors), ``backend.py`` the ``TargetBackend`` (partition, features), ``decode.py`` the decode session and batched
generation.
"""

from dspark.targets.pipeline.backend import PipelineTarget

__all__ = ["PipelineTarget"]
