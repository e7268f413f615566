"""The /v1/jobs body: a Chat Completions body (every option checked as chat checks it) plus
the job's own fields, and `document` (with optional `instructions`) instead of messages."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, model_validator

from app.errors import APIError
from app.policy import REQUESTED_MODES, document_messages
from app.services.chat_request import ChatCompletionRequest, Message
from app.services.jobs import MAX_PRIORITY

JOB_EXAMPLE: dict[str, Any] = {"model": "mock/echo", "document": "A document.", "mode": "batch"}


def _checked_job_fields(body: dict[str, Any]) -> None:
    """The job's own fields, checked before any chat option (each a 400 naming it)."""
    if body.get("mode", "auto") not in REQUESTED_MODES:
        raise APIError(400, f"mode must be one of {list(REQUESTED_MODES)}", param="mode")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise APIError(400, "priority must be an integer", param="priority")
    if abs(priority) > MAX_PRIORITY:
        raise APIError(
            400, f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}", param="priority"
        )
    has_messages, has_document = "messages" in body, "document" in body
    if has_messages == has_document:
        raise APIError(400, "Send exactly one of messages or document.", param="messages")
    if has_document:
        document, instructions = body["document"], body.get("instructions")
        if not isinstance(document, str) or not document.strip():
            raise APIError(400, "document must be a non-empty string", param="document")
        if instructions is not None and not isinstance(instructions, str):
            raise APIError(400, "instructions must be a string", param="instructions")
    elif "instructions" in body:
        raise APIError(400, "instructions only applies with document", param="instructions")


class JobRequest(ChatCompletionRequest):
    """`messages` or `document` (with optional `instructions`), plus any chat option; the
    job always runs as a stream when routed to one (`stream` is the routing policy's input)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [JOB_EXAMPLE]})

    messages: list[Message] | None = Field(None, min_length=1)  # type: ignore[assignment]
    document: str | None = Field(None, min_length=1)
    instructions: str | None = None
    mode: str = Field("auto", json_schema_extra={"enum": list(REQUESTED_MODES)})
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    @model_validator(mode="before")
    @classmethod
    def _job_fields(cls, data: Any) -> Any:
        """The job's fields; a document becomes the messages (runs before the chat checks)."""
        if not isinstance(data, dict):
            return data  # the chat body's own check answers
        _checked_job_fields(data)
        if "document" in data:
            data["messages"] = document_messages(data["document"], data.get("instructions"))
        return data

    def streams(self) -> bool:
        """A stream-mode job always streams (`stream` may be left out); a batch one never."""
        if self.mode == "stream":
            return self.stream is not False  # an explicit `stream: false` contradicts it
        return self.mode != "batch" and bool(self.stream)

    def record(self) -> dict[str, Any]:
        """The chat body to run: a stream route always answers SSE."""
        return super().record() | {"stream": True}
