"""A batch of jobs, submitted as documents or as an OpenAI batch input file."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import ForeignKey, Index, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow

KINDS = ("documents", "openai")
STATUSES = (
    "validating", "in_progress", "finalizing", "completed",
    "failed", "cancelling", "cancelled", "expired",
)  # fmt: skip
TERMINAL = ("completed", "failed", "cancelled", "expired")


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_tenant_id_id", "tenant_id", "id"),
        Index("ix_batches_tenant_id_idempotency_key", "tenant_id", "idempotency_key", unique=True),
        Index("ix_batches_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("batch_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(12))
    status: Mapped[str] = mapped_column(String(12), default="validating")
    endpoint: Mapped[str] = mapped_column(String(60), default="/v1/chat/completions")
    model: Mapped[str | None] = mapped_column(String(200))
    instructions: Mapped[str | None] = mapped_column(Text)
    prompt_template: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any] | None]
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    input_hash: Mapped[str | None] = mapped_column(String(64))  # 0006: the items' SHA-256
    completion_window: Mapped[str] = mapped_column(String(10), default="24h")
    input_file_id: Mapped[str | None] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    errors: Mapped[list[Any] | None]
    route_rule: Mapped[str | None] = mapped_column(String(100))
    route_reason: Mapped[str | None] = mapped_column(String(500))
    total: Mapped[int] = mapped_column(default=0)
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    executor: Mapped[str | None] = mapped_column(String(12))  # 0005: "workers" | "provider"
    finalizer: Mapped[str | None] = mapped_column(String(200))  # 0008: claim lease while finalizing


batches_t = cast(Table, Batch.__table__)  # the batches table, for Core statements
