"""LLM providers behind one interface: check(), stream() and complete()."""

from app.providers.base import (
    ChatRequest,
    ChoiceDelta,
    Completion,
    Provider,
    ProviderError,
    ProviderStream,
    Unsupported,
    Usage,
    delta_text,
)
from app.providers.messages import estimate_tokens
from app.providers.registry import (
    ProviderRegistry,
    UnknownModel,
    build_registry,
    init_app,
    providers,
)

__all__ = [
    "ChatRequest",
    "ChoiceDelta",
    "Completion",
    "Provider",
    "ProviderError",
    "ProviderRegistry",
    "ProviderStream",
    "UnknownModel",
    "Unsupported",
    "Usage",
    "build_registry",
    "delta_text",
    "estimate_tokens",
    "init_app",
    "providers",
]
