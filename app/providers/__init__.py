"""LLM providers behind one interface: stream() and complete()."""

from app.providers.base import (
    ChatRequest,
    ChoiceDelta,
    Completion,
    Provider,
    ProviderError,
    ProviderStream,
    Usage,
    delta_text,
    estimate_tokens,
)
from app.providers.registry import ProviderRegistry, UnknownModel, build_registry

__all__ = [
    "ChatRequest",
    "ChoiceDelta",
    "Completion",
    "Provider",
    "ProviderError",
    "ProviderRegistry",
    "ProviderStream",
    "UnknownModel",
    "Usage",
    "build_registry",
    "delta_text",
    "estimate_tokens",
]
