"""Packaged models: real LLMs installed from PyPI as GGUF files, converted once to HF folders."""

from afa_serve.models.cache import cache_root, is_pulled, model_folder
from afa_serve.models.registry import REGISTRY, PackagedModel, packaged_model
from afa_serve.models.resolve import resolve_model

__all__ = [
    "REGISTRY",
    "PackagedModel",
    "cache_root",
    "is_pulled",
    "model_folder",
    "packaged_model",
    "resolve_model",
]
