"""What the SDK-backed providers share: a lazily made, reused SDK client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from app.providers import gevent_compat
from app.providers.base import ProviderError


class SDKProvider:
    """A provider whose calls go through one official SDK client, made on first use."""

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
        gevent_compat.install()
        with self._lock:
            if self._client is None:
                self._client = self._make_client(api_key)
        return self._client
