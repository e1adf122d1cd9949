"""Megatron-core tensor-parallel hosting of llama/qwen3 targets (``target.backend=megatron``).

``model.py`` is the decoder over a layer factory, ``parallel.py`` the megatron layers and process groups,
``adapter.py`` the HF checkpoint -> per-rank shard map, ``backend.py`` the ``TargetBackend``.
"""

from dspark.targets.megatron.backend import MegatronDecodeSession, MegatronTarget

__all__ = ["MegatronDecodeSession", "MegatronTarget"]
