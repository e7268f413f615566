"""LLM providers behind one interface: stream() and complete()."""

from app.providers.base import (
    ChatRequest,
    Completion,
    Provider,
    ProviderError,
    ProviderStream,
    Usage,
    estimate_tokens,
)
from app.providers.registry import ProviderRegistry, UnknownModel, build_registry

__all__ = [
    "ChatRequest",
    "Completion",
    "Provider",
    "ProviderError",
    "ProviderRegistry",
    "ProviderStream",
    "UnknownModel",
    "Usage",
    "build_registry",
    "estimate_tokens",
]
