"""What the SDK-backed providers share: a lazily made, reused SDK client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from app.providers.base import ChatRequest, ProviderError
from app.providers.errors import map_sdk_error


class SDKProvider:
    """A provider whose calls go through one official SDK client, made on first use."""

    sdk: ModuleType  # the SDK module: `openai` or `anthropic`

    def __init__(
        self,
        name: str,
        *,
        api_key: str | Callable[[], str | None] | None,
        base_url: str | None = None,
        timeout: float = 600.0,
        key_hint: str,
    ) -> None:
        self.name = name
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._key_hint = key_hint
        self._client: Any = None
        self._lock = threading.Lock()

    def check(self, request: ChatRequest) -> None:
        """Raise Unsupported for a parameter this provider cannot honour (none by default)."""

    def _map(self, exc: BaseException) -> ProviderError | None:
        """Map an exception raised by this provider's SDK calls."""
        return map_sdk_error(exc, self.name, self.sdk)

    def _make_client(self, api_key: str) -> Any:
        """Build the SDK client (no SDK retries: Sluice retries itself)."""
        raise NotImplementedError

    def _get_client(self) -> Any:
        """The provider's SDK client, made on first use and then reused."""
        if self._client is not None:
            return self._client
        api_key = self._api_key() if callable(self._api_key) else self._api_key
        if not api_key:
            raise ProviderError(
                f"{self._key_hint} is not set; cannot call provider '{self.name}'",
                retryable=False,
                code="provider_not_configured",
            )
        with self._lock:
            if self._client is None:
                self._client = self._make_client(api_key)
        return self._client
