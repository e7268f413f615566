"""Resolve "provider/model" names to provider instances built from the app config.

One registry per app, made by `init_app` (from `create_app`) and reached through
`providers()` by the web and the workers alike; each provider keeps its SDK client.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from app.providers import gevent_compat
from app.providers.base import ChatRequest, Provider
from app.providers.catalog import ModelCatalog
from app.services import capacity

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)
EXTENSION = "sluice_providers"

DUMMY_API_KEY = "sk-none"
KINDS = ("openai", "anthropic", "mock")

ProviderFactory = Callable[[], Provider]


class UnknownModel(ValueError):
    """A model name that does not resolve to a configured provider."""


class ProviderRegistry:
    """Named provider factories; each provider is built on first use and then cached."""

    def __init__(self, factories: Mapping[str, ProviderFactory] | None = None) -> None:
        self._factories: dict[str, ProviderFactory] = dict(factories or {})
        self._providers: dict[str, Provider] = {}
        self._models: dict[str, tuple[str, ...]] = {}
        self._fetch_models: set[str] = set()
        self._lock = threading.Lock()
        self.catalog = ModelCatalog(self)

    def register(
        self,
        name: str,
        provider: Provider | ProviderFactory,
        *,
        models: tuple[str, ...] = (),
        fetch_models: bool = False,
    ) -> None:
        """Add or replace a provider (an instance or a zero-argument factory).

        `models` are the model names it declares; with `fetch_models` its own `/models`
        list is added to them (OpenAI-compatible providers).
        """
        if not name or "/" in name:
            raise ValueError(f"bad provider name {name!r}")
        with self._lock:
            self._providers.pop(name, None)
            self._models[name] = models
            if fetch_models:
                self._fetch_models.add(name)
            else:
                self._fetch_models.discard(name)
            if isinstance(provider, Provider):
                instance = provider
                self._factories[name] = lambda: instance
            else:
                self._factories[name] = provider

    def names(self) -> list[str]:
        """The known provider names, in registration order."""
        return list(self._factories)

    def declared_models(self, name: str) -> tuple[str, ...]:
        """The model names provider `name` declares (sluice.toml `models = [...]`)."""
        return self._models.get(name, ())

    def fetches_models(self, name: str) -> bool:
        """Whether provider `name`'s own model list is fetched (`fetch_models = true`)."""
        return name in self._fetch_models

    def get(self, name: str) -> Provider:
        """The provider called `name`, constructing it on first use."""
        provider = self._providers.get(name)
        if provider is not None:
            return provider
        if name not in self._factories:
            raise UnknownModel(f"unknown provider '{name}'; known: {', '.join(self.names())}")
        with self._lock:
            provider = self._providers.get(name)
            if provider is None:
                provider = self._factories[name]()
                self._providers[name] = provider
        return provider

    def resolve(self, model: str) -> tuple[Provider, str]:
        """Split "provider/model" on the first "/" and return (provider, provider's model name)."""
        if not isinstance(model, str) or "/" not in model:
            raise UnknownModel(
                f"model must look like provider/model (e.g. mock/echo), got {model!r}"
            )
        name, _, upstream_model = model.partition("/")
        if not name or not upstream_model.strip():
            raise UnknownModel(
                f"model must look like provider/model (e.g. mock/echo), got {model!r}"
            )
        if name not in self._factories:
            raise UnknownModel(
                f"unknown provider '{name}' in model '{model}'; known: {', '.join(self.names())}"
            )
        return self.get(name), upstream_model

    def bind(self, request: ChatRequest) -> tuple[Provider, ChatRequest]:
        """The provider for a request, and the request as that provider sees it (its model)."""
        provider, upstream_model = self.resolve(request.model)
        return provider, replace(request, model=upstream_model)

    def warm_up(self) -> None:
        """Build every provider and its SDK client now, not inside the first job.

        The first use of an SDK imports a lot of code; under gevent that blocks the whole
        worker for seconds, long enough for every running job's lease to lapse.
        """
        for name in self.names():
            try:
                provider = self.get(name)
                client = getattr(provider, "_get_client", None)
                if client is not None:
                    sdk = client()
                    getattr(sdk, "chat", None) and sdk.chat.completions
                    getattr(sdk, "messages", None)
            except Exception as exc:  # an unconfigured provider is fine until someone uses it
                log.debug("warm-up of provider %s skipped: %s", name, exc)


def _key_source(
    table: Mapping[str, Any], fallback: str | None
) -> str | Callable[[], str | None] | None:
    """A literal key, an environment lookup made at call time, or the fallback."""
    if table.get("api_key"):
        return str(table["api_key"])
    env_name = table.get("api_key_env")
    if env_name:
        return lambda: os.environ.get(str(env_name)) or fallback
    return fallback


def _setting(
    table: Mapping[str, Any], key: str, config: Mapping[str, Any], conf_key: str, default: Any
) -> Any:
    """A table value, else the app config value, else the default (None counts as unset)."""
    for value in (table.get(key), config.get(conf_key)):
        if value is not None and value != "":
            return value
    return default


def _factory(
    name: str, table: Mapping[str, Any], config: Mapping[str, Any], builtin: bool
) -> ProviderFactory:
    """A factory for one provider from its `[providers.NAME]` table and the app config."""
    kind = str(table.get("kind", name if builtin else "openai"))
    timeout = float(_setting(table, "timeout", config, "PROVIDER_TIMEOUT", 600.0))
    if kind == "mock":
        from app.providers.mock import MockProvider, MockSettings

        settings = MockSettings(
            length=int(_setting(table, "length", config, "MOCK_LENGTH", 40)),
            ttft_ms=float(_setting(table, "ttft_ms", config, "MOCK_TTFT_MS", 50)),
            tokens_per_second=float(
                _setting(table, "tokens_per_second", config, "MOCK_TOKENS_PER_SECOND", 50)
            ),
        )
        return lambda: MockProvider(name, settings)
    # The SDK modules are imported when a provider is first built, not here: listing the
    # names (the web does, per process) must not pay seconds of SDK imports.
    if kind == "openai":
        base_url = table.get("base_url") or (config.get("OPENAI_BASE_URL") if builtin else None)
        key = _key_source(table, config.get("OPENAI_API_KEY") if builtin else DUMMY_API_KEY)
        hint = "OPENAI_API_KEY" if builtin else f"the API key for provider '{name}'"

        def make_openai() -> Any:
            from app.providers.openai_provider import OpenAIProvider

            return OpenAIProvider(
                name, api_key=key, base_url=base_url, timeout=timeout, key_hint=hint
            )

        return make_openai
    if kind == "anthropic":
        base_url = table.get("base_url") or (config.get("ANTHROPIC_BASE_URL") if builtin else None)
        key = _key_source(table, config.get("ANTHROPIC_API_KEY") if builtin else DUMMY_API_KEY)
        hint = "ANTHROPIC_API_KEY" if builtin else f"the API key for provider '{name}'"
        max_tokens = int(
            _setting(table, "default_max_tokens", config, "ANTHROPIC_DEFAULT_MAX_TOKENS", 1024)
        )

        def make_anthropic() -> Any:
            from app.providers.anthropic_provider import AnthropicProvider

            return AnthropicProvider(
                name,
                api_key=key,
                base_url=base_url,
                timeout=timeout,
                default_max_tokens=max_tokens,
                key_hint=hint,
            )

        return make_anthropic
    raise ValueError(f"providers.{name}: unknown kind {kind!r}; expected one of {KINDS}")


def _model_options(name: str, table: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The `models` and `fetch_models` settings of a `[providers.NAME]` table."""
    models = table.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"providers.{name}.models must be a list of model names")
    if kind == "mock":
        from app.providers.mock import MODELS

        models = [*MODELS, *(m for m in models if m not in MODELS)]
    fetch = table.get("fetch_models", False)
    if not isinstance(fetch, bool):
        raise ValueError(f"providers.{name}.fetch_models must be true or false")
    if fetch and kind != "openai":
        raise ValueError(f"providers.{name}.fetch_models needs an OpenAI-compatible provider")
    return {"models": tuple(models), "fetch_models": fetch}


def build_registry(config: Mapping[str, Any]) -> ProviderRegistry:
    """Build the registry: mock, openai, anthropic, plus each `[providers.NAME]` table."""
    tables: Mapping[str, Any] = config.get("PROVIDERS") or {}
    registry = ProviderRegistry()
    for name in ("mock", "openai", "anthropic"):
        table = tables.get(name) or {}
        capacity.check(name, table)  # shared with streams: app.services.capacity
        registry.register(
            name,
            _factory(name, table, config, builtin=True),
            **_model_options(name, table, str(table.get("kind", name))),
        )
    for name, table in tables.items():
        if name in KINDS:
            continue
        if not isinstance(table, Mapping):
            raise ValueError(f"providers.{name} must be a table")
        kind = table.get("kind", "openai")
        if kind in ("openai", "anthropic") and not table.get("base_url"):
            raise ValueError(f"providers.{name} needs a base_url")
        options = _model_options(name, table, str(kind))
        capacity.check(name, table)
        registry.register(name, _factory(name, table, config, builtin=False), **options)
    return registry


def init_app(app: Flask) -> ProviderRegistry:
    """Build the app's provider registry (ValueError on a bad `[providers]` table).

    Also keeps the SDKs' HTTP pool from yielding to the gevent hub (see gevent_compat).
    """
    gevent_compat.install()
    registry = app.extensions[EXTENSION] = build_registry(app.config)
    return registry


def providers(app: Flask | None = None) -> ProviderRegistry:
    """The provider registry of `app` (default: the current app)."""
    from flask import current_app

    registry: ProviderRegistry | None = (app or current_app).extensions.get(EXTENSION)
    if registry is None:
        raise RuntimeError("providers.init_app(app) was not called for this app")
    return registry
