"""The per-provider semaphore of batch workers: a lease set per provider in Redis.

At most `limit` provider calls in flight per provider across every batch worker sharing
this Redis. Each slot is a lease (`app.leases`); a background thread renews this process's
slots, and a holder that dies stops renewing, so its slots come back on their own.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from app import leases
from app.extensions import current_flask_app, redis_store

log = logging.getLogger(__name__)

LOCAL_GATE_MAX = 128  # provider calls in flight per process (the Redis pool holds 200)
QUIET_LOGGERS = ("httpx", "httpx2", "openai", "anthropic")  # one INFO line per call otherwise


class ProviderSemaphore:
    """At most `limit` holders per provider across every process sharing this Redis."""

    def __init__(self, client: redis.Redis, limit: int, lease: float = 30.0) -> None:
        self.client = client
        self.limit = max(1, limit)
        self.lease = max(1.0, lease)
        self._local: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self.renewer = leases.Renewer(client, self.lease, live_only=True)

    @staticmethod
    def key(provider: str) -> str:
        return f"sluice:provider-sem:{provider}"

    def try_acquire(self, provider: str) -> str | None:
        """A slot token, or None when all slots are taken."""
        token = uuid.uuid4().hex
        key = self.key(provider)
        full, _ = leases.acquire(self.client, [key], token, leases.ms(self.lease), [self.limit])
        if full:
            return None
        self.renewer.hold(key, token)
        return token

    def release(self, token: str) -> None:
        key = self.renewer.drop(token)
        if key:
            leases.release(self.client, key, token)

    def in_use(self, provider: str) -> int:
        """Live slots (expired leases excluded)."""
        return leases.live_count(self.client, self.key(provider))

    @contextmanager
    def slot(self, provider: str) -> Iterator[None]:
        """Hold one slot for `provider` while the block runs; waits (polling) for one."""
        local = self._local_gate(provider)
        with local:
            delay = 0.005
            token = self.try_acquire(provider)
            while token is None:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)
                token = self.try_acquire(provider)
            try:
                yield
            finally:
                self.release(token)

    def _local_gate(self, provider: str) -> threading.BoundedSemaphore:
        """A per-process gate, so at most `limit` local waiters poll Redis."""
        with self._lock:
            gate = self._local.get(provider)
            if gate is None:
                size = min(self.limit, LOCAL_GATE_MAX)
                gate = self._local[provider] = threading.BoundedSemaphore(size)
            return gate


def semaphore() -> ProviderSemaphore:
    """This app's semaphore (one per process and app), made on first use."""
    app = current_flask_app()
    sem = app.extensions.get("sluice_provider_semaphore")
    if sem is None:
        for name in QUIET_LOGGERS:  # per-request INFO lines cost more than the request here
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        sem = app.extensions["sluice_provider_semaphore"] = ProviderSemaphore(
            redis_store.client,
            app.config["PROVIDER_CONCURRENCY"],
            app.config["PROVIDER_LEASE_SECONDS"],
        )
    return sem
