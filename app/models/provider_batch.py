"""A batch submitted to a provider's own batch API (OpenAI Batches, Anthropic Message Batches).

Each row is one provider batch: the items it carries are the jobs whose `provider_batch_id`
names it. `remote_id` is the provider's batch id, stored before anything waits on the
provider, so a poller that dies resumes from it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow

# submitting: items assigned, not yet claimed by a sender; sending: a sender claimed it
# (or died, or lost the answer: reconciled before creating again); in_progress: the
# provider has it (remote_id set); applied: its results are in the item rows; failed:
# the provider refused it (its items failed with that error).
STATUSES = ("submitting", "sending", "in_progress", "applied", "failed")
OPEN = ("submitting", "sending", "in_progress")


class ProviderBatch(Base):
    __tablename__ = "provider_batches"
    __table_args__ = (
        Index("ix_provider_batches_status_next_poll_at", "status", "next_poll_at"),
        Index("ix_provider_batches_batch_id", "batch_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("pbatch_"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(60))
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(12), default="submitting")
    remote_id: Mapped[str | None] = mapped_column(String(200))
    remote_status: Mapped[str | None] = mapped_column(String(30))
    remote_counts: Mapped[dict[str, Any] | None]
    total: Mapped[int] = mapped_column(default=0)
    polls: Mapped[int] = mapped_column(default=0)
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[datetime | None]
    next_poll_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
