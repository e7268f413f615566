"""Jobs: the API serializer and starting a stream job (the /v1/jobs body: job_request.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert, select, update

from app.extensions import db, redis_store
from app.models import Job, epoch, new_id, utcnow
from app.models.job import jobs_t
from app.policy import Route
from app.providers import ChatRequest
from app.queueing import STREAM_QUEUE, push_task
from app.services.costs import job_cost_usd
from app.services.events import job_changed
from app.services.provider_batches.rows import cancel_job_remote
from app.services.stream_runner import STREAM_TASK, end_unsent_job

log = logging.getLogger(__name__)

MAX_PRIORITY = 2**31 - 1  # the jobs.priority column is a 32-bit integer


def job_object(job: Job, *, output: str | None = None) -> dict[str, Any]:
    """The API representation of a job; `output` overrides the row's (live text while running)."""
    return {
        "id": job.id,
        "object": "job",
        "mode": job.mode,
        "status": job.status,
        "endpoint": job.endpoint,
        "model": job.model,
        "provider": job.provider,
        "route": {
            "mode": job.mode,
            "rule": job.route_rule,
            "reason": job.route_reason,
            "on_disconnect": job.on_disconnect,
            # #13: who ran a background job ("workers" | "provider"); streams have none
            **({"executor": job.executor or "workers"} if job.mode == "batch" else {}),
        },
        "batch_id": job.batch_id,
        "item_id": job.item_id,
        "created_at": epoch(job.created_at),
        "started_at": epoch(job.started_at),
        "first_token_at": epoch(job.first_token_at),
        "finished_at": epoch(job.finished_at),
        "timings": {
            "queued_ms": job.queued_ms,
            "ttft_ms": job.ttft_ms,
            "duration_ms": job.duration_ms,
        },
        "attempts": job.attempts,
        "worker": job.worker,
        "output": job.output if output is None else output,
        "choices": job.choices,  # the chat.completion choices when the answer is more than text
        "finish_reason": job.finish_reason,
        "usage": job.usage,
        "cost_usd": job_cost_usd(job),
        "error": job.error,
        "metadata": job.metadata_,
    }


def cancel_background_job(job_id: str, error: dict[str, Any]) -> bool:
    """Cancel a queued background job (False: it already runs); its provider batch too (#13).

    On the provider executor a job stays `queued` while its provider batch runs: it ends
    `cancelled` here, and the provider batch is cancelled once no other job waits in it.
    """
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", finished_at=utcnow(), error=error)
    )
    cancelled = bool(db.session.execute(stmt).rowcount)  # type: ignore[attr-defined]
    db.session.commit()
    if cancelled:
        pb_id = db.session.scalar(select(Job.provider_batch_id).where(Job.id == job_id))
        if pb_id:
            cancel_job_remote(pb_id)
    return cancelled


def start_stream_job(
    tenant_id: str,
    body: ChatRequest,
    route: Route,
    *,
    job_id: str | None = None,
    endpoint: str = "/v1/chat/completions",
    priority: int = 0,
    before_send: Callable[[], object] | None = None,
    previous_response_id: str | None = None,
) -> Job:
    """Commit a queued stream Job and send its task to the `interactive` queue.

    The returned Job is not bound to the session and has every column loaded, so reading
    it never costs a query. Pass job_id when a stream slot was already taken for it;
    `before_send()` runs between the commit and the send (the relay's Tail.sending). A send that
    fails ends the job (end_unsent_job) and raises; a message lost later is re-sent by the
    stream sweep.
    """
    record = body.to_record()
    values: dict[str, Any] = {
        "id": job_id or new_id("job_"),
        "tenant_id": tenant_id,
        "mode": "stream",
        "status": "queued",
        "endpoint": endpoint,
        "route_rule": route.rule[:100] if route.rule else None,
        "route_reason": route.reason[:500] if route.reason else None,
        "provider": body.provider,
        "model": body.model,
        "priority": priority,
        "on_disconnect": route.on_disconnect,
        "request": record,
        "metadata_": body.metadata,
        "previous_response_id": previous_response_id,
        "attempts": 0,
        "created_at": utcnow(),
    }
    columns = {"metadata" if k == "metadata_" else k: v for k, v in values.items()}
    db.session.execute(insert(jobs_t), [columns])  # Core: no ORM bulk-insert layer
    db.session.commit()
    job = Job(**values)
    try:
        if before_send is not None:
            before_send()
        with redis_store.client.pipeline(transaction=False) as pipe:  # task + note: one trip
            push_task(pipe, STREAM_TASK, [job.id, record], STREAM_QUEUE)
            job_changed(job, pipe)
            for answer in pipe.execute(raise_on_error=False)[:-1]:  # the note is best effort
                if isinstance(answer, Exception):
                    raise answer
    except Exception:
        if end_unsent_job(job.id):  # ended: the client's retry is a new job, not a second run
            raise
        log.warning("job %s: its send raised, but a worker took it; streaming", job.id)
    return job


def completion_object(
    job_id: str,
    model: str,
    created: int,
    text: str,
    finish: str | None,
    usage: Any,
    choices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `chat.completion` object for a job's output, as OpenAI's API returns it."""
    message = {"role": "assistant", "content": text, "refusal": None}
    if choices is None:
        choices = [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish or "stop"}
        ]
    return {
        "id": f"chatcmpl-{job_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage,
    }


def job_completion_object(job: Job) -> dict[str, Any]:
    """The `chat.completion` the chat endpoint would have returned for this job."""
    usage = job.usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    total = int(usage.get("total_tokens") or prompt + completion)
    return completion_object(
        job.id,
        job.model,
        epoch(job.created_at),
        job.output or "",
        job.finish_reason,
        {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total},
        choices=job.choices,
    )
