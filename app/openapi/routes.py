"""Every route's description, by Flask endpoint (tests/test_openapi.py fails on a route
that is missing here). Bodies and objects are the models of app.openapi.schemas."""

from __future__ import annotations

from app.models import job as job_model
from app.openapi import schemas as s
from app.openapi.operations import (
    FORM,
    HTML,
    JSON,
    JSONL,
    MULTIPART,
    SSE,
    Operation,
    Param,
    Response,
    integer,
    json_response,
    string,
)
from app.services.files import UPLOAD_PURPOSES

LIMIT = Param("limit", integer(minimum=1, maximum=100, default=20), description="page size")
AFTER = Param("after", string(maxLength=64), description="the last id of the previous page")
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key", string(maxLength=255), "header", "a retried create returns the same object"
)
PREFER = Param(
    "Prefer", string(examples=["respond-async", "wait=10"]), "header", "RFC 7240 preferences"
)
LAST_EVENT_ID = Param(
    "Last-Event-ID",
    string(pattern=r"^\d{1,20}-\d{1,20}$"),
    "header",
    "resume after this event (SSE reconnection)",
)
JOB_STATUS = string(enum=list(job_model.STATUSES))

SSE_EVENT = {  # one event of the stream (as OpenAPI 3.2's itemSchema describes SSE)
    "type": "object",
    "description": "A Server-Sent Event; `data` is one JSON object per event (or `[DONE]`)",
    "properties": {
        "event": string(),
        "data": string(),
        "id": string(),
        "retry": integer(minimum=0),
    },
}
SSE_BODY = {SSE: SSE_EVENT}
JOB_LINKS = {
    "GetJob": ("v1.jobs.show_job", "job_id"),
    "CancelJob": ("v1.jobs.cancel_job", "job_id"),
    "FollowJob": ("v1.jobs.job_events", "job_id"),
}
DOC_LINKS = {
    "GetDocumentBatch": ("v1.document_batches.get", "batch_id"),
    "CancelDocumentBatch": ("v1.document_batches.cancel", "batch_id"),
    "DocumentBatchResults": ("v1.document_batches.results", "batch_id"),
    "DocumentBatchEvents": ("v1.document_batches.events", "batch_id"),
}
FILE_LINKS = {
    "GetFile": ("v1.files.retrieve_file", "file_id"),
    "GetFileContent": ("v1.files.file_content", "file_id"),
    "DeleteFile": ("v1.files.delete_file", "file_id"),
}
RESPONSE_LINKS = {"GetResponse": ("v1.responses.get_response", "response_id")}
BATCH_LINKS = {
    "GetBatch": ("v1.batches.retrieve_batch", "batch_id"),
    "CancelBatch": ("v1.batches.cancel_batch", "batch_id"),
}

ACCEPTED_JOB = json_response(
    "Routed to the batch channel (Location: /v1/jobs/{id})",
    s.Job,
    headers=("Location", "X-Sluice-Job-Id", "X-Sluice-Route"),
    links=JOB_LINKS,
)
STREAMED = Response(
    "A stream route: the job's SSE (`chat.completion.chunk` events, then `[DONE]`), or with"
    " `Prefer: wait=N` a finished job",
    {SSE: SSE_EVENT, JSON: {"anyOf": [s.ChatCompletion, s.Job]}},
    headers=("X-Sluice-Job-Id", "X-Sluice-Route"),
    links=JOB_LINKS,
)

ROUTES: dict[str, Operation] = {
    # -- chat and jobs --------------------------------------------------------------------
    "v1.chat.chat_completions": Operation(
        "Create a chat completion (OpenAI Chat Completions)",
        "chat",
        {
            "200": Response(
                "`stream: true`: SSE of `chat.completion.chunk`; otherwise one"
                " `chat.completion` (or, with `Prefer: wait=N`, the finished job's)",
                {SSE: SSE_EVENT, JSON: {"anyOf": [s.ChatCompletion, s.Job]}},
                headers=("X-Sluice-Job-Id", "X-Sluice-Route"),
                links=JOB_LINKS,
            ),
            "202": ACCEPTED_JOB,
        },
        body=s.ChatCompletionRequest,
        params=(PREFER,),
    ),
    "v1.responses.create_response": Operation(
        "Create a response (OpenAI Responses API), run as a chat job",
        "responses",
        {
            "200": Response(
                "`stream: true`: SSE of the Responses events (`event:` names, `sequence_number`);"
                " otherwise the `response` (with `Prefer: wait=N`, the finished background one)",
                {SSE: SSE_EVENT, JSON: s.ResponseObject},
                headers=("X-Sluice-Job-Id", "X-Sluice-Route"),
                links=RESPONSE_LINKS,
            ),
            "202": json_response(
                "Routed to the batch channel: the `response`, queued (poll GET)",
                s.ResponseObject,
                headers=("Location", "X-Sluice-Job-Id", "X-Sluice-Route"),
                links=RESPONSE_LINKS,
            ),
        },
        body=s.ResponsesRequest,
        params=(PREFER,),
    ),
    "v1.responses.get_response": Operation(
        "Retrieve a response; `stream=true` replays its events after `starting_after`",
        "responses",
        {"200": Response("The response, or its SSE", {JSON: s.ResponseObject, SSE: SSE_EVENT})},
        params=(
            Param("stream", string(enum=["true", "false"]), description="replay the events"),
            Param(
                "starting_after",
                string(pattern=r"^\d{1,18}$"),
                description="with stream=true: the last sequence_number seen",
            ),
        ),
    ),
    "v1.responses.list_input_items": Operation(
        "List a response's input items (messages, function calls and their outputs)",
        "responses",
        {"200": json_response("A page of input items", s.ListOf[s.AnyObject])},
        params=(
            LIMIT,
            AFTER,
            Param("order", string(enum=["asc", "desc"], default="desc")),
        ),
    ),
    "v1.responses.cancel_response": Operation(
        "Cancel a response (its job: a stream keeps its partial output)",
        "responses",
        {"200": json_response("The response as it is after the cancel", s.ResponseObject)},
    ),
    "v1.submit.submit_job": Operation(
        "Submit a job; the routing policy picks the stream or batch channel",
        "jobs",
        {"200": STREAMED, "202": ACCEPTED_JOB},
        body=s.JobRequest,
        params=(PREFER,),
    ),
    "v1.spend.show_spend": Operation(  # #13
        "The tenant's spend this UTC day (USD) and its daily budget, if any",
        "jobs",
        {"200": json_response("Spend", s.AnyObject)},
    ),
    "v1.jobs.list_jobs": Operation(
        "List the tenant's jobs, newest first",
        "jobs",
        {"200": json_response("A page of jobs", s.ListOf[s.Job])},
        params=(
            Param("mode", string(enum=list(job_model.MODES))),
            Param("status", JOB_STATUS),
            LIMIT,
            AFTER,
        ),
    ),
    "v1.jobs.show_job": Operation(
        "Retrieve a job (its output so far while it runs)",
        "jobs",
        {"200": json_response("The job", s.Job)},
    ),
    "v1.jobs.job_events": Operation(
        "Follow (or resume) a stream job's events",
        "jobs",
        {
            "200": Response("The job's SSE from the start or after Last-Event-ID", SSE_BODY),
            "204": Response("Not a stream job, its log expired, or the client has seen the end"),
        },
        params=(
            LAST_EVENT_ID,
            Param("last_event_id", LAST_EVENT_ID.schema, description="as Last-Event-ID"),
        ),
    ),
    "v1.jobs.cancel_job": Operation(
        "Cancel a job (a stream keeps its partial output)",
        "jobs",
        {"200": json_response("The job as it is after the cancel", s.Job)},
    ),
    # -- document batches -----------------------------------------------------------------
    "v1.document_batches.create": Operation(
        "Submit a document batch (JSON, multipart files or JSONL)",
        "document-batches",
        {
            "200": json_response("An Idempotency-Key replay", s.DocumentBatch, links=DOC_LINKS),
            "202": json_response(
                "Accepted (Location: /v1/document-batches/{id})",
                s.DocumentBatch,
                headers=("Location",),
                links=DOC_LINKS,
            ),
        },
        body={
            JSON: s.DocumentBatchRequest,
            MULTIPART: s.DocumentBatchUpload,
            JSONL: string(description="one document object per line; batch fields in the query"),
        },
        params=(IDEMPOTENCY_KEY,),
    ),
    "v1.document_batches.list_batches": Operation(
        "List document batches, newest first",
        "document-batches",
        {"200": json_response("A page of batches", s.ListOf[s.DocumentBatch])},
        params=(LIMIT, AFTER),
    ),
    "v1.document_batches.get": Operation(
        "Retrieve a document batch",
        "document-batches",
        {"200": json_response("The batch", s.DocumentBatch)},
    ),
    "v1.document_batches.cancel": Operation(
        "Cancel a document batch",
        "document-batches",
        {"200": json_response("The batch, cancelling or cancelled", s.DocumentBatch)},
    ),
    "v1.document_batches.results": Operation(
        "A document batch's results, one JSON line per document in submission order",
        "document-batches",
        {"200": Response("JSONL results", {JSONL: string()})},
        params=(Param("status", JOB_STATUS),),
    ),
    "v1.document_batches.events": Operation(
        "A document batch's progress as SSE (`progress` events, then `done`)",
        "document-batches",
        {"200": Response("SSE progress", SSE_BODY)},
    ),
    # -- OpenAI files and batches ---------------------------------------------------------
    "v1.files.upload_file": Operation(
        "Upload a file (OpenAI Files API)",
        "files",
        {"200": json_response("The file", s.FileObject, links=FILE_LINKS)},
        body={MULTIPART: s.FileUpload},
    ),
    "v1.files.list_files": Operation(
        "List files",
        "files",
        {"200": json_response("A page of files", s.ListOf[s.FileObject])},
        params=(
            Param("purpose", string(enum=list(UPLOAD_PURPOSES))),
            Param("limit", integer(minimum=1, maximum=10000, default=10000)),
            AFTER,
            Param("order", string(enum=["asc", "desc"], default="desc")),
        ),
    ),
    "v1.files.retrieve_file": Operation(
        "Retrieve a file", "files", {"200": json_response("The file", s.FileObject)}
    ),
    "v1.files.file_content": Operation(
        "A file's content",
        "files",
        {"200": Response("The bytes", {"application/octet-stream": string(format="binary")})},
    ),
    "v1.files.delete_file": Operation(
        "Delete a file", "files", {"200": json_response("Deleted", s.FileDeleted)}
    ),
    "v1.batches.create_batch": Operation(
        "Create a batch (OpenAI Batches API)",
        "batches",
        {"200": json_response("The batch", s.BatchObject, links=BATCH_LINKS)},
        body=s.BatchRequest,
        params=(IDEMPOTENCY_KEY,),
    ),
    "v1.batches.list_batches": Operation(
        "List batches",
        "batches",
        {"200": json_response("A page of batches", s.ListOf[s.BatchObject])},
        params=(LIMIT, AFTER),
    ),
    "v1.batches.retrieve_batch": Operation(
        "Retrieve a batch", "batches", {"200": json_response("The batch", s.BatchObject)}
    ),
    "v1.batches.cancel_batch": Operation(
        "Cancel a batch", "batches", {"200": json_response("The batch", s.BatchObject)}
    ),
    # -- models, keys ---------------------------------------------------------------------
    "v1.models.list_models": Operation(
        "List models",
        "models",
        {"200": json_response("Models", s.Listing[s.ModelObject])},
    ),
    "v1.models.get_model": Operation(
        "Retrieve a model", "models", {"200": json_response("The model", s.ModelObject)}
    ),
    "v1.keys.me": Operation(
        "The calling key", "keys", {"200": json_response("The key (no secret)", s.ApiKey)}
    ),
    "v1.keys.list_keys": Operation(
        "List every API key (admin)",
        "admin",
        {"200": json_response("Keys", s.Listing[s.ApiKey])},
    ),
    "v1.keys.create": Operation(
        "Create an API key (admin); its tenant is created if new",
        "admin",
        {
            "201": json_response(
                "The key, with its only copy of the secret",
                s.ApiKeyCreated,
                links={"RevokeKey": ("v1.keys.revoke", "key_id")},
            )
        },
        body=s.KeyRequest,
    ),
    "v1.admin.workers": Operation(
        "Live and recent workers (admin)",
        "admin",
        {"200": json_response("Workers", s.Listing[s.AnyObject])},
    ),
    "v1.admin.admin_stats": Operation(
        "Throughput, latency and queue figures over a window (admin)",
        "admin",
        {"200": json_response("Stats", s.AnyObject)},
        params=(Param("window", string(examples=["15m", "1h", "24h"])),),
    ),
    "v1.keys.revoke": Operation(
        "Revoke an API key (admin)", "admin", {"200": json_response("Revoked", s.KeyRevoked)}
    ),
    # -- operators --------------------------------------------------------------------------
    "health.healthz": Operation(
        "Liveness", "probes", {"200": json_response("Up", s.Status)}, security=None
    ),
    "health.readyz": Operation(
        "Readiness: database, Redis and a live worker of each mode",
        "probes",
        {
            "200": json_response("Ready", s.AnyObject),
            "503": json_response("Not ready, naming what is missing", s.AnyObject),
        },
        security=None,
    ),
    "metrics.metrics": Operation(
        "Prometheus metrics",
        "probes",
        {"200": Response("Prometheus text format", {"text/plain": string()})},
        security=None,
    ),
    "openapi.spec": Operation(
        "This description", "probes", {"200": json_response("OpenAPI 3.1", s.AnyObject)}, None
    ),
    "dashboard.index": Operation(
        "The operators' dashboard (admin session)",
        "dashboard",
        {
            "200": Response("The page", {HTML: string()}),
            "302": Response("Sign in first", headers=("Location",)),
        },
        security="session",
    ),
    "dashboard.login": Operation(
        "Sign in to the dashboard with an admin key",
        "dashboard",
        {
            "200": Response("The sign-in form", {HTML: string()}),
            "302": Response("Signed in: on to `next`", headers=("Location",)),
            "401": Response("Not a live admin key", {HTML: string()}),
        },
        body={FORM: s.DashboardLogin},
        body_required=False,
        params=(
            Param("token", string(), description="a one-time link's token (GET)"),
            Param("next", string(), description="where to go once signed in (GET)"),
        ),
        security=None,
    ),
    "dashboard.login_link": Operation(
        "A one-time sign-in link for a browser (admin key as Bearer)",
        "dashboard",
        {"200": json_response("The link", s.LoginLink)},
        params=(Param("next", string()),),
    ),
    "dashboard.logout": Operation(
        "Sign out",
        "dashboard",
        {"302": Response("To the sign-in form", headers=("Location",))},
        security=None,
    ),
    "dashboard.api_summary": Operation(
        "Dashboard summary (workers, queues, counts)",
        "dashboard",
        {"200": json_response("The summary", s.AnyObject)},
        security="session",
    ),
    "dashboard.api_capacity": Operation(  # #13
        "Dashboard: each provider's capacity split by mode (streams, batch)",
        "dashboard",
        {"200": json_response("Capacity by provider", s.AnyObject)},
        security="session",
    ),
    "dashboard.api_jobs": Operation(
        "Dashboard: newest jobs of every tenant",
        "dashboard",
        {"200": json_response("Jobs", s.AnyObject)},
        params=(
            Param("mode", string()),
            Param("status", string()),
            Param("before", string()),
            Param("limit", string()),
        ),
        security="session",
    ),
    "dashboard.api_batches": Operation(
        "Dashboard: newest batches",
        "dashboard",
        {"200": json_response("Batches", s.AnyObject)},
        params=(Param("limit", string()),),
        security="session",
    ),
    "dashboard.stream": Operation(
        "Dashboard live feed (flask-sse message format)",
        "dashboard",
        {"200": Response("SSE", SSE_BODY)},
        security="session",
    ),
    "dashboard.api_charts": Operation(
        "Dashboard charts: every series over a window, from the per-minute rollup",
        "dashboard",
        {"200": json_response("Series by name, with their step starts", s.AnyObject)},
        params=(
            Param(
                "window",
                string(examples=["15m", "1h", "24h"]),
                description="15m, 1h or 24h (anything else: 1h)",
            ),
        ),
        security="session",
    ),
    "dashboard.job_page": Operation(
        "A job's page: fields, route, timeline, usage, error, live text",
        "dashboard",
        {
            "200": Response("The page", {HTML: string()}),
            "302": Response("Sign in first", headers=("Location",)),
            "404": Response("No such job", {HTML: string()}),
        },
        security="session",
    ),
    "dashboard.api_job": Operation(
        "A job of any tenant, as GET /v1/jobs/{id} plus tenant, request and timeline",
        "dashboard",
        {"200": json_response("The job", s.AnyObject)},
        security="session",
    ),
    "dashboard.api_job_events": Operation(
        "A job's SSE relay, as GET /v1/jobs/{id}/events (any tenant)",
        "dashboard",
        {
            "200": Response("The job's SSE from the start or after Last-Event-ID", SSE_BODY),
            "204": Response("Not a stream job, its log expired, or the client has seen the end"),
        },
        params=(LAST_EVENT_ID,),
        security="session",
    ),
    "dashboard.api_job_cancel": Operation(
        "Cancel a job of any tenant, as POST /v1/jobs/{id}/cancel",
        "dashboard",
        {"200": json_response("The job as it is after the cancel", s.Job)},
        params=(Param("X-Sluice-Dashboard", string(enum=["1"]), "header", required=True),),
        security="session",
    ),
    "dashboard.playground": Operation(
        "The playground page",
        "dashboard",
        {
            "200": Response("The page", {HTML: string()}),
            "302": Response("Sign in first", headers=("Location",)),
        },
        security="session",
    ),
    "dashboard.api_models": Operation(
        "The playground's model list, as GET /v1/models",
        "dashboard",
        {"200": json_response("Models", s.Listing[s.ModelObject])},
        security="session",
    ),
    "dashboard.api_playground_submit": Operation(
        "Submit a job as the signed-in admin key, as POST /v1/jobs",
        "dashboard",
        {  # as POST /v1/jobs answers, without its links (a session's, not a bearer's)
            "200": Response(STREAMED.description, STREAMED.content, STREAMED.headers),
            "202": Response(ACCEPTED_JOB.description, ACCEPTED_JOB.content, ACCEPTED_JOB.headers),
        },
        body=s.JobRequest,
        params=(Param("X-Sluice-Dashboard", string(enum=["1"]), "header", required=True),),
        security="session",
    ),
    "dashboard.static": Operation(
        "Dashboard assets",
        "dashboard",
        {"200": Response("The file", {"*/*": string(format="binary")})},
        security=None,
    ),
    "static": Operation(
        "Flask's static folder (empty)",
        "probes",
        {"200": Response("The file", {"*/*": string(format="binary")})},
        security=None,
    ),
}
