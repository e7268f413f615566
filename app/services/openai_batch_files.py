"""The output and error files of an OpenAI batch, written once at finalization."""

from __future__ import annotations

import json
from typing import Any

from app.models import Batch, Job
from app.models.job import TERMINAL
from app.services import files as storage
from app.services.batches import batch_jobs
from app.services.jobs import job_completion_object

ERROR_STATUSES = tuple(s for s in TERMINAL if s != "succeeded")  # failed, cancelled, expired


def _suffix(job: Job) -> str:
    return job.id.split("_", 1)[-1]


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, separators=(",", ":")) + "\n").encode()


def output_line(job: Job) -> dict[str, Any]:
    return {
        "id": f"batch_req_{_suffix(job)}",
        "custom_id": job.item_id,
        "response": {
            "status_code": 200,
            "request_id": f"req_{_suffix(job)}",
            "body": job_completion_object(job),
        },
        "error": None,
    }


def error_line(job: Job) -> dict[str, Any]:
    error = dict(job.error or {})
    status = error.pop("status_code", None) or error.pop("status", None)
    code = error.get("code") or ("batch_" + job.status if job.status != "failed" else "failed")
    message = error.get("message") or f"The request ended {job.status}."
    response = None
    if isinstance(status, int):
        body = {
            "message": message,
            "type": error.get("type") or "invalid_request_error",
            "param": error.get("param"),
            "code": error.get("code"),
        }
        response = {
            "status_code": status,
            "request_id": f"req_{_suffix(job)}",
            "body": {"error": body},
        }
    return {
        "id": f"batch_req_{_suffix(job)}",
        "custom_id": job.item_id,
        "response": response,
        "error": {"code": code, "message": message},
    }


def write_result_files(batch: Batch) -> None:
    """The finalizer of OpenAI batches: write the output and error files.

    Sets output_file_id / error_file_id (None when that file would be empty); the engine
    commits. Token usage is already on the batch (counted as results were written).
    """
    output = storage.create_generated_file(
        batch.tenant_id,
        f"{batch.id}_output.jsonl",
        "batch_output",
        (_line(output_line(job)) for job in batch_jobs(batch, "succeeded")),
        key=f"{batch.id}_output.jsonl",
    )
    errors = storage.create_generated_file(
        batch.tenant_id,
        f"{batch.id}_error.jsonl",
        "batch_output",
        (_line(error_line(job)) for job in batch_jobs(batch, *ERROR_STATUSES)),
        key=f"{batch.id}_error.jsonl",
    )
    batch.output_file_id = output.id if output else None
    batch.error_file_id = errors.id if errors else None
