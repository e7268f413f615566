"""Claim leases: who holds a running batch item or a finalizing batch, and whether it lives.

A claim is a member of the CLAIMS_KEY lease set (`app.leases`), renewed in the background
while its block runs, and named in the row it holds (`jobs.worker`, `batches.finalizer`)
as "<worker>/<token>". A row whose holder's lease lapsed (its process died, stalled or
was restarted) is the sweeper's to take back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import redis

from app import leases
from app.extensions import current_flask_app, redis_store
from app.services.batches import CLAIMS_KEY

log = logging.getLogger(__name__)


def claims() -> leases.Renewer:
    """This process's claim leases (one per running chunk or job), renewed in the background."""
    app = current_flask_app()
    renewer: leases.Renewer | None = app.extensions.get("sluice_batch_claims")
    if renewer is None:
        renewer = app.extensions["sluice_batch_claims"] = leases.Renewer(
            redis_store.client, app.config["BATCH_LEASE_SECONDS"], live_only=False
        )
    return renewer


@contextmanager
def claim_lease(worker: str) -> Iterator[str]:
    """A lease for one claim, held (and renewed) while the block runs; yields its holder name.

    Taken before the claim, so every claimed row names a lease that was live. The sweeper
    re-queues running items whose holder's lease lapsed, whoever held it.
    """
    renewer = claims()
    token = uuid.uuid4().hex
    leases.acquire(renewer.client, [CLAIMS_KEY], token, leases.ms(renewer.seconds))
    renewer.hold(CLAIMS_KEY, token)
    try:
        yield f"{worker}/{token}"
    finally:
        renewer.drop(token)
        try:
            leases.release(renewer.client, CLAIMS_KEY, token)
        except Exception:
            log.warning("could not release claim lease %s; it lapses on its own", token)


def holder_token(holder: str | None) -> str:
    """The lease token in a job's `worker` column ("" for none)."""
    return holder.rpartition("/")[2] if holder and "/" in holder else ""


def lapsed_holders(client: redis.Redis, holders: Iterable[str | None]) -> list[str | None]:
    """The holders (None: a row with none) whose claim lease is no longer live."""
    tokens = {holder: holder_token(holder) for holder in holders}
    live = leases.live_members(client, CLAIMS_KEY, [t for t in tokens.values() if t])
    return [holder for holder, token in tokens.items() if token not in live]
