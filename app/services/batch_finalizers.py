"""Kind-specific work when a batch's last item has ended."""

from __future__ import annotations

from app.models import Batch


def finalize(batch: Batch) -> None:
    """Called exactly once per batch, while it is `finalizing`, before it is `completed`."""
    if batch.kind == "openai":
        from app.services.openai_batches import write_result_files

        write_result_files(batch)
