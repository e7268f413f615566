"""The request and response bodies of the API, as pydantic models (their JSON Schema is the
contract at /openapi.json).

The JSON request bodies are the models each route validates with (app.front_door.parse_body):
they live next to their checks and are re-exported here. The response objects are described
here; tests/test_openapi.py checks that each serializer answers exactly their keys.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from app.api.batches import BatchRequest as BatchRequest
from app.api.keys import KeyRequest as KeyRequest
from app.models import batch as batch_model
from app.models import job as job_model
from app.services.chat_request import MODEL_FIELD
from app.services.chat_request import ChatCompletionRequest as ChatCompletionRequest
from app.services.documents import DocumentBatchRequest as DocumentBatchRequest
from app.services.job_request import JobRequest as JobRequest
from app.services.responses_request import ResponsesRequest as ResponsesRequest

T = TypeVar("T")


def optional(**constraints: Any) -> Any:
    """An optional field: absent means unset (the validators treat a key that is not sent as
    the provider's default)."""
    return Field(default=None, **constraints)


def _enum(values: tuple[str, ...]) -> dict[str, Any]:
    return {"enum": list(values)}


class _Open(BaseModel):
    """A body that may carry more keys than those named (every key is carried or refused)."""

    model_config = ConfigDict(extra="allow")


# -- errors and lists ------------------------------------------------------------------------


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class Error(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


class Listing(BaseModel, Generic[T]):
    """A whole list, unpaged (models, keys)."""

    object: Literal["list"]
    data: list[T]


class ListOf(BaseModel, Generic[T]):
    """OpenAI's cursor page."""

    object: Literal["list"]
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


# -- chat ------------------------------------------------------------------------------------


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


# -- responses (OpenAI's Responses API) -------------------------------------------------------


class ResponseObject(_Open):
    """OpenAI's `response` object; its id names the job (`resp_<x>` is `job_<x>`)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: str = Field(
        json_schema_extra=_enum(
            ("queued", "in_progress", "completed", "incomplete", "failed", "cancelled")
        )
    )
    background: bool = Field(description="true: routed to the batch channel; poll GET")
    completed_at: int | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    model: str
    output: list[dict[str, Any]] = Field(description="message, function_call, reasoning items")
    usage: dict[str, Any] | None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: None
    metadata: dict[str, str]
    parallel_tool_calls: bool
    previous_response_id: None
    prompt_cache_key: str | None
    reasoning: dict[str, Any]
    safety_identifier: str | None
    service_tier: str | None
    store: bool
    temperature: float | None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int
    top_p: float | None
    truncation: str
    user: str | None


# -- jobs ------------------------------------------------------------------------------------


class JobRoute(_Open):
    mode: str
    rule: str | None
    reason: str | None
    on_disconnect: str | None
    executor: str | None = Field(  # #13
        None,
        description="background jobs: who ran it",
        json_schema_extra=_enum(("workers", "provider")),
    )


class JobTimings(_Open):
    queued_ms: float | None
    ttft_ms: float | None
    duration_ms: float | None


class Job(_Open):
    id: str
    object: Literal["job"]
    mode: str = Field(json_schema_extra=_enum(job_model.MODES))
    status: str = Field(json_schema_extra=_enum(job_model.STATUSES))
    endpoint: str | None
    model: str
    provider: str | None
    route: JobRoute
    batch_id: str | None
    item_id: str | None
    created_at: int | None
    started_at: int | None
    first_token_at: int | None
    finished_at: int | None
    timings: JobTimings
    attempts: int
    worker: str | None
    output: str | None
    choices: list[dict[str, Any]] | None = Field(
        None, description="the chat.completion choices when the answer is more than text"
    )
    finish_reason: str | None
    usage: dict[str, Any] | None
    cost_usd: float | None = Field(description="USD, from usage, model price and executor")  # #13
    error: dict[str, Any] | None
    metadata: dict[str, Any] | None


# -- document batches ------------------------------------------------------------------------


class DocumentBatchUpload(BaseModel):
    """multipart/form-data: the batch fields as form fields, each document a file part."""

    model: str = MODEL_FIELD
    instructions: str = Field(min_length=1)
    prompt_template: str = optional()
    max_tokens: str = optional()
    temperature: str = optional()
    response_format: str = optional(description="JSON text")
    metadata: str = optional(description="JSON text")
    completion_window: str = optional()
    files: list[bytes] = optional(
        description="one file part per document (any part name; .txt .md .html .pdf .docx .jsonl)",
        json_schema_extra={"items": {"type": "string", "format": "binary"}},
    )


class Counts(_Open):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int


class RequestCounts(_Open):
    total: int
    completed: int
    failed: int


class DocumentBatch(_Open):
    id: str
    object: Literal["document_batch"]
    status: str = Field(json_schema_extra=_enum(batch_model.STATUSES))
    model: str
    instructions: str | None
    prompt_template: str | None
    params: dict[str, Any]
    metadata: dict[str, Any] | None
    completion_window: str
    counts: Counts
    request_counts: RequestCounts
    usage: Usage
    errors: Any
    route: dict[str, Any]
    cost_usd: float = Field(description="USD: the sum of its items' costs")  # #13
    created_at: int | None
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expires_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    results_url: str


# -- OpenAI files and batches ----------------------------------------------------------------


class FileUpload(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"purpose": "batch", "file": '{"custom_id": "a"}\n'}]}
    )

    file: bytes = Field(json_schema_extra={"format": "binary", "type": "string"})
    purpose: str = Field(examples=["batch"])


class FileObject(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int | None
    expires_at: int | None
    filename: str
    purpose: str
    status: str
    status_details: str | None


class FileDeleted(_Open):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchObject(_Open):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None = None
    errors: dict[str, Any] | None
    input_file_id: str | None
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int | None
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, Any] | None
    usage: dict[str, Any] | None = None


# -- keys, models, probes --------------------------------------------------------------------


class ApiKey(_Open):
    id: str
    object: Literal["api_key"]
    tenant: str
    prefix: str
    name: str | None
    admin: bool
    created_at: int | None
    revoked_at: int | None


class ApiKeyCreated(ApiKey):
    key: str = Field(description="the only copy of the secret")


class KeyRevoked(_Open):
    id: str
    object: Literal["api_key"]
    revoked: bool


class ModelObject(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class Status(_Open):
    status: str


class AnyObject(_Open):
    """A JSON object whose keys are documented in the README (operators' views)."""


class LoginLink(_Open):
    url: str
    expires_in: int


class DashboardLogin(BaseModel):
    key: str
    next: str = optional()
