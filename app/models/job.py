"""A job: one generation, streamed or run in the background."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import ForeignKey, Index, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow

MODES = ("stream", "batch")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled", "expired")  # expired: batch items only


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_jobs_tenant_id_mode_status_id", "tenant_id", "mode", "status", "id"),
        Index("ix_jobs_batch_id_status", "batch_id", "status"),
        Index("ix_jobs_batch_id_item_index", "batch_id", "item_index", unique=True),
        Index("ix_jobs_status_started_at", "status", "started_at"),
        Index("ix_jobs_executor_status", "executor", "status"),  # 0005
        Index("ix_jobs_provider_batch_id", "provider_batch_id"),  # 0005
        Index("ix_jobs_cost_usd_finished_at", "cost_usd", "finished_at"),  # 0005: settle
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    mode: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(12), default="queued")
    endpoint: Mapped[str] = mapped_column(String(60), default="/v1/chat/completions")
    route_rule: Mapped[str | None] = mapped_column(String(100))
    route_reason: Mapped[str | None] = mapped_column(String(500))
    provider: Mapped[str] = mapped_column(String(60))
    model: Mapped[str] = mapped_column(String(200))
    priority: Mapped[int] = mapped_column(default=0)
    on_disconnect: Mapped[str] = mapped_column(
        String(10), default="detach", server_default="detach"
    )
    request: Mapped[dict[str, Any]]
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    output: Mapped[str | None] = mapped_column(Text)
    choices: Mapped[list[Any] | None]  # chat.completion choices when more than text (0003)
    finish_reason: Mapped[str | None] = mapped_column(String(30))
    usage: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    attempts: Mapped[int] = mapped_column(default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    item_index: Mapped[int | None]
    item_id: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    first_token_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # 0005 (cost-aware routing): who ran a batch-mode job ("workers" | "provider"; None for
    # a stream), the provider batch that carries it, and what it cost (None until priced)
    executor: Mapped[str | None] = mapped_column(String(12))
    provider_batch_id: Mapped[str | None] = mapped_column(String(40))
    cost_usd: Mapped[float | None]
    # 0007: the response a /v1/responses job continues (`previous_response_id`)
    previous_response_id: Mapped[str | None] = mapped_column(String(40))

    @property
    def queued_ms(self) -> float | None:
        return _ms_since(self.created_at, self.started_at)

    @property
    def ttft_ms(self) -> float | None:
        return _ms_since(self.created_at, self.first_token_at)

    @property
    def duration_ms(self) -> float | None:
        return _ms_since(self.created_at, self.finished_at)


def _ms_since(start: datetime | None, end: datetime | None) -> float | None:
    """Milliseconds from start to end, rounded to 0.1 (None until both are known)."""
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000, 1)


jobs_t = cast(Table, Job.__table__)  # the jobs table, for Core statements
