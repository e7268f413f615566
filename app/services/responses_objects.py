"""The Responses API's objects, built from a job: the `response`, its output items, usage.

A response id is its job's id (`resp_<x>` for `job_<x>`); item ids are derived from it and
the item's place in `output`, so a stream, its resume and GET name the same items. The
request fields a response echoes are read back from the job's stored chat record, so POST
and GET show the same object (a leading system message shows as `instructions`).
"""

from __future__ import annotations

import time
from typing import Any

from app.models import Job, epoch
from app.streams.entries import CANCELLED_CODE, Generation

JOB_PREFIX = "job_"
RESPONSE_PREFIX = "resp_"
ITEM_PREFIXES = {"message": "msg", "function_call": "fc", "reasoning": "rs"}
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_id(job_id: str) -> str:
    return RESPONSE_PREFIX + job_id.removeprefix(JOB_PREFIX)


def job_id_of(resp_id: str) -> str | None:
    """The job a response id names (None: not a response id)."""
    if not resp_id.startswith(RESPONSE_PREFIX):
        return None
    return JOB_PREFIX + resp_id.removeprefix(RESPONSE_PREFIX)


def item_id(job_id: str, kind: str, index: int) -> str:
    return f"{ITEM_PREFIXES[kind]}_{job_id.removeprefix(JOB_PREFIX)}_{index}"


def item_response_id(ident: str) -> str | None:
    """The response an output or input item id belongs to (None: not one of Sluice's)."""
    parts = ident.split("_")
    if len(parts) != 3 or not parts[1] or not parts[2].removeprefix("in").isdigit():
        return None
    return RESPONSE_PREFIX + parts[1]


# -- the request, echoed ---------------------------------------------------------------------


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") or {}
    return {
        "type": "function",
        "name": function.get("name"),
        "description": function.get("description"),
        "parameters": function.get("parameters"),
        "strict": function.get("strict"),
    }


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "name": (choice.get("function") or {}).get("name")}
    return choice or "auto"


def _text(record: dict[str, Any]) -> dict[str, Any]:
    fmt = record.get("response_format") or {"type": "text"}
    if fmt.get("type") == "json_schema":
        fmt = {"type": "json_schema", **(fmt.get("json_schema") or {})}
    text: dict[str, Any] = {"format": fmt}
    if record.get("verbosity") is not None:
        text["verbosity"] = record["verbosity"]
    return text


def echo(record: dict[str, Any], previous_response_id: str | None = None) -> dict[str, Any]:
    """The request fields a `response` object shows, from the job's chat record."""
    messages = record.get("messages") or []
    first = messages[0] if messages else {}
    instructions = first.get("content") if first.get("role") == "system" else None
    return {
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": record.get("max_completion_tokens"),
        "max_tool_calls": None,
        "metadata": record.get("metadata") or {},
        "parallel_tool_calls": record.get("parallel_tool_calls", True),
        "previous_response_id": previous_response_id,
        "prompt_cache_key": record.get("prompt_cache_key"),
        "reasoning": {"effort": record.get("reasoning_effort"), "summary": None},
        "safety_identifier": record.get("safety_identifier"),
        "service_tier": record.get("service_tier", "auto"),
        "store": True,  # Sluice keeps every job, whatever the request's `store` said
        "temperature": record.get("temperature", 1.0),
        "text": _text(record),
        "tool_choice": _tool_choice(record.get("tool_choice")),
        "tools": [_tool(t) for t in record.get("tools") or [] if t.get("type") == "function"],
        "top_logprobs": 0,
        "top_p": record.get("top_p", 1.0),
        "truncation": "disabled",
        "user": record.get("user"),
    }


# -- output and usage ------------------------------------------------------------------------


def usage(chat: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat `usage` as Responses `usage` (input/output tokens and their details)."""
    if not chat:
        return None
    prompt = int(chat.get("prompt_tokens") or 0)
    completion = int(chat.get("completion_tokens") or 0)
    details = chat.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or 0
    written = details.get("cache_write_tokens") or 0
    reasoning = (chat.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": int(written)},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": int(chat.get("total_tokens") or prompt + completion),
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def refusal_part(refusal: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": refusal}


def message_item(ident: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": ident, "type": "message", "status": status, "role": "assistant", "content": parts}


def reasoning_item(ident: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"id": ident, "type": "reasoning", "summary": [], "content": content, "status": status}


def call_item(ident: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "id": ident,
        "type": "function_call",
        "status": status,
        "arguments": function.get("arguments") or "",
        "call_id": call.get("id") or "",
        "name": function.get("name") or "",
    }


def output_items(job_id: str, message: dict[str, Any], status: str) -> list[dict[str, Any]]:
    """A chat.completion message as output items: reasoning, message, function calls."""
    items: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        ident = item_id(job_id, "reasoning", len(items))
        items.append(reasoning_item(ident, message["reasoning_content"], status))
    parts = []
    if message.get("content"):
        parts.append(text_part(message["content"]))
    if message.get("refusal"):
        parts.append(refusal_part(message["refusal"]))
    if parts:
        items.append(message_item(item_id(job_id, "message", len(items)), parts, status))
    for call in message.get("tool_calls") or []:
        items.append(call_item(item_id(job_id, "function_call", len(items)), call, status))
    return items


def ending(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """The response status a finish reason gives, and its `incomplete_details`."""
    reason = INCOMPLETE.get(finish_reason or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def failure(error: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The status and `error` object of a failed (or cancelled) job.

    `code` is one of OpenAI's response error codes; the job's own error code and type
    (`upstream_timeout`, `job_cancelled`...) ride in `type` and the message.
    """
    own = error.get("code") or error.get("type")
    status = "cancelled" if own == CANCELLED_CODE else "failed"
    code = "rate_limit_exceeded" if error.get("type") == "rate_limit_error" else "server_error"
    message = str(error.get("message") or "The job failed.")
    return status, {
        "code": code,
        "message": f"{message} ({own})" if own else message,
        "param": error.get("param"),
        "type": error.get("type"),
    }


def response_object(
    job_id: str,
    model: str,
    created: int,
    record: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete: dict[str, Any] | None = None,
    completed_at: int | None = None,
    background: bool = False,
    previous_response_id: str | None = None,
) -> dict[str, Any]:
    """The `response` object, as OpenAI's API returns it (`background`: a batch-channel job)."""
    return {
        "id": response_id(job_id),
        "object": "response",
        "created_at": created,
        "status": status,
        "background": background,
        "completed_at": completed_at,
        "error": error,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "usage": usage,
        **echo(record, previous_response_id),
    }


def running_response(job: Job, message: dict[str, Any], status: str) -> dict[str, Any]:
    """The response of a queued or running job, with what it said so far."""
    output = output_items(job.id, message, "in_progress")
    record = job.request or {}
    background = job.mode == "batch"
    created = epoch(job.created_at)
    return response_object(
        job.id,
        job.model,
        created,
        record,
        status=status,
        output=output,
        background=background,
        previous_response_id=job.previous_response_id,
    )


def finished_response(
    job: Job,
    message: dict[str, Any],
    *,
    finish_reason: str | None,
    chat_usage: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> dict[str, Any]:
    """The response of a job that ended: completed, incomplete, failed or cancelled."""
    if error is not None:
        status, failed = failure(error)
        details = None
    else:
        status, details = ending(finish_reason)
        failed = None
    done = status == "completed"
    output = output_items(job.id, message, "completed" if done else "incomplete")
    return response_object(
        job.id,
        job.model,
        epoch(job.created_at),
        job.request or {},
        status=status,
        output=output,
        usage=usage(chat_usage) if error is None else None,
        error=failed,
        incomplete=details,
        completed_at=(epoch(job.finished_at) or int(time.time())) if done else None,
        background=job.mode == "batch",
        previous_response_id=job.previous_response_id,
    )


def generation_response(job: Job, generation: Generation) -> dict[str, Any]:
    """The response of a stream job as its log tells it (running until the log ends)."""
    message: dict[str, Any] = generation.messages()[0]["message"]
    if not generation.ended:
        return running_response(job, message, "in_progress")
    return finished_response(
        job,
        message,
        finish_reason=generation.finish_reason,
        chat_usage=generation.usage,
        error=generation.error,
    )


def row_message(job: Job) -> dict[str, Any]:
    """The chat.completion message a job's row holds (its text alone, if only text)."""
    choices = job.choices or []
    message: dict[str, Any] | None = choices[0].get("message") if choices else None
    return message or {"content": job.output or ""}


def job_response(job: Job) -> dict[str, Any]:
    """The response of a job from its row."""
    message = row_message(job)
    if job.status in ("queued", "running"):
        return running_response(job, message, "queued" if job.status == "queued" else "in_progress")
    error = None
    if job.status != "succeeded":
        error = job.error or {"message": f"The job is {job.status}.", "code": job.status}
    return finished_response(
        job, message, finish_reason=job.finish_reason, chat_usage=job.usage, error=error
    )


# -- conversation state ----------------------------------------------------------------------


def _own_messages(job: Job) -> list[dict[str, Any]]:
    """The chat messages a response was sent, its instructions (a leading system message,
    as `echo` reads it) left out."""
    messages = list((job.request or {}).get("messages") or [])
    if messages and messages[0].get("role") == "system":
        messages = messages[1:]
    return messages


def conversation(job: Job) -> list[dict[str, Any]]:
    """What a response continuing this one carries in: its input, then its output as an
    assistant turn (text, refusal, reasoning, tool calls); not its instructions, as OpenAI."""
    said = row_message(job)
    turn = {k: said[k] for k in ("content", "refusal", "reasoning_content", "tool_calls")
            if said.get(k)}  # fmt: skip
    return _own_messages(job) + ([{"role": "assistant", **turn}] if turn else [])


# -- input items (GET /v1/responses/{id}/input_items) ----------------------------------------


def _input_content(part: Any, assistant: bool) -> dict[str, Any]:
    """A chat content part as the Responses content part it was sent as."""
    if isinstance(part, str) or part.get("type") == "text":
        text = part if isinstance(part, str) else part.get("text") or ""
        return text_part(text) if assistant else {"type": "input_text", "text": text}
    if part.get("type") == "refusal":
        return refusal_part(part.get("refusal") or "")
    if part.get("type") == "image_url":
        image = part.get("image_url") or {}
        detail = image.get("detail", "auto")
        return {"type": "input_image", "image_url": image.get("url"), "detail": detail}
    if part.get("type") == "file":
        file = part.get("file") or {}
        return {
            "type": "input_file",
            **{k: file[k] for k in ("file_data", "filename") if k in file},
        }
    return dict(part)


def _input_ident(job_id: str, prefix: str, index: int) -> str:
    return f"{prefix}_{job_id.removeprefix(JOB_PREFIX)}_in{index}"


def input_items(job: Job) -> list[dict[str, Any]]:
    """The input items of a response, in order, from its job's chat record.

    A leading system message is the response's `instructions` (as `echo` reads it), not an
    item; an assistant message with tool calls is its text, then one function_call each.
    """
    items: list[dict[str, Any]] = []
    for message in _own_messages(job):
        role = message.get("role")
        content = message.get("content")
        if role == "tool":
            output = content if isinstance(content, str) else [
                _input_content(part, False) for part in content or []
            ]  # fmt: skip
            ident = _input_ident(job.id, "fco", len(items))
            items.append(
                {"id": ident, "type": "function_call_output", "status": "completed",
                 "call_id": message.get("tool_call_id") or "", "output": output}
            )  # fmt: skip
            continue
        assistant = role == "assistant"
        parts = [content] if isinstance(content, str) else list(content or [])
        if parts:
            ident = _input_ident(job.id, "msg", len(items))
            items.append(
                {"id": ident, "type": "message", "role": role, "status": "completed",
                 "content": [_input_content(part, assistant) for part in parts]}
            )  # fmt: skip
        for call in message.get("tool_calls") or []:
            items.append(call_item(_input_ident(job.id, "fc", len(items)), call, "completed"))
    return items
