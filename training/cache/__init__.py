"""Latent and text-embedding cache: encode once with the graph's VAE and CLIP, re-encode only what changed.

``build_cache`` writes or updates a cache folder (safetensors shards + a JSON index); ``CacheReader``
serves the trainer aspect-bucketed batches from it. No ComfyUI import: encoders come in as callables.
"""

from ..data import Batch
from .builder import BuildReport, build_cache
from .keys import state_dict_identity, tensor_identity, truncate_tokens
from .loader import CacheReader
from .sd3 import LatentEncoder, TextEncoder, TextEncoding
from .store import CacheWriteError, cache_fingerprint

__all__ = [
    "Batch",
    "BuildReport",
    "CacheReader",
    "CacheWriteError",
    "LatentEncoder",
    "TextEncoder",
    "TextEncoding",
    "build_cache",
    "cache_fingerprint",
    "state_dict_identity",
    "tensor_identity",
    "truncate_tokens",
]
