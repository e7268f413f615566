"""The models Sluice routes to, for GET /v1/models: declared lists plus fetched ones.

Each provider's declared models (the mock's presets, `models = [...]` in sluice.toml) are
listed at once. An OpenAI-compatible provider with `fetch_models = true` also contributes
its own `/models`, fetched in a background thread and cached: a listing never waits for
an upstream and never fails because one is down (it shows the last good list, if any).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.providers.registry import ProviderRegistry

log = logging.getLogger(__name__)

REFRESH_SECONDS = 300.0  # how long a fetched list is fresh
RETRY_SECONDS = 30.0  # how soon a failed fetch is tried again


@dataclass
class _Fetched:
    """One provider's fetched model list and when it is due again."""

    ids: tuple[str, ...] = ()
    due: float = 0.0  # monotonic time after which a listing triggers a refresh
    running: bool = False


class ModelCatalog:
    """The OpenAI `model` objects of every provider of a registry."""

    def __init__(self, registry: ProviderRegistry) -> None:
        self._registry = registry
        self._fetched: dict[str, _Fetched] = {}
        self._lock = threading.Lock()
        self.created = int(time.time())

    def models(self) -> list[dict[str, Any]]:
        """Every model, as OpenAI's `model` objects, provider by provider."""
        self._refresh_due()
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for name in self._registry.names():
            fetched = self._fetched.get(name)
            for model in (*self._registry.declared_models(name), *(fetched.ids if fetched else ())):
                model_id = f"{name}/{model}"
                if model_id not in seen:
                    seen.add(model_id)
                    out.append(self._object(model_id, name))
        return out

    def get(self, model_id: str) -> dict[str, Any] | None:
        """The `model` object for "provider/model", or None if no provider lists it."""
        return next((m for m in self.models() if m["id"] == model_id), None)

    def _object(self, model_id: str, owner: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": owner}

    def _refresh_due(self) -> None:
        """Start a background fetch for each fetching provider whose list is due."""
        now = time.monotonic()
        for name in self._registry.names():
            if not self._registry.fetches_models(name):
                continue
            with self._lock:
                state = self._fetched.setdefault(name, _Fetched())
                if state.running or now < state.due:
                    continue
                state.running = True
            threading.Thread(
                target=self._fetch, args=(name, state), daemon=True, name=f"models-{name}"
            ).start()

    def _fetch(self, name: str, state: _Fetched) -> None:
        try:
            list_models = getattr(self._registry.get(name), "list_models", None)
            if list_models is None:
                raise TypeError("the provider cannot list its models")
            ids = tuple(list_models())
        except Exception as exc:
            log.warning("could not list the models of provider %s: %s", name, exc)
            state.due = time.monotonic() + RETRY_SECONDS
        else:
            state.ids = ids
            state.due = time.monotonic() + REFRESH_SECONDS
        finally:
            state.running = False
