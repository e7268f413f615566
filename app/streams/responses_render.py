"""Log entries -> the Responses API's SSE events (`event:` names, `sequence_number`), for one job.

The events follow OpenAI's order: response.created and response.in_progress, then per
output item `output_item.added`, its parts and deltas, `output_item.done`; the terminal
entry closes the open item and ends with response.completed (or .incomplete, .failed).
Sequence numbers are counted from the log's start, so a relay that replays the log with
`skip_through=N` resumes exactly after the event numbered N.
"""

from __future__ import annotations

import json
import time
from typing import Any

from app import sse
from app.models import Job, epoch
from app.services import responses_objects as objects
from app.streams.entries import ChoiceDelta, choices_of, error_of, usage_of

PART_EVENTS = {  # a content part's kind -> (its delta event, its done event, its text key)
    "output_text": ("response.output_text.delta", "response.output_text.done", "text"),
    "refusal": ("response.refusal.delta", "response.refusal.done", "refusal"),
    "reasoning_text": ("response.reasoning_text.delta", "response.reasoning_text.done", "text"),
}
DELTA_KEYS = (("reasoning_content", "reasoning_text"), ("content", "output_text"))


class ResponsesRenderer:
    """Renders one job's entries as the events of a streamed `response`."""

    def __init__(self, job: Job, *, skip_through: int = -1) -> None:
        self.job = job
        self.created = epoch(job.created_at)
        self.record = job.request or {}
        self.skip_through = skip_through
        self.sequence = 0
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.part: dict[str, Any] | None = None  # its content part being streamed
        self.call_index: int | None = None  # the chat tool-call index of an open call
        self.started = False

    # -- events ------------------------------------------------------------------------------

    def _event(self, kind: str, **payload: Any) -> str:
        number = self.sequence
        self.sequence += 1
        if number <= self.skip_through:
            return ""
        data = {"type": kind, "sequence_number": number, **payload}
        return sse.frame(json.dumps(data, separators=(",", ":")), event=kind)

    def _response(self, status: str, **fields: Any) -> dict[str, Any]:
        job = self.job
        return objects.response_object(
            job.id,
            job.model,
            self.created,
            self.record,
            status=status,
            previous_response_id=job.previous_response_id,
            **fields,
        )

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    # -- items and parts ---------------------------------------------------------------------

    def _open_item(self, item: dict[str, Any]) -> str:
        self.items.append(item)
        self.open = item
        index = len(self.items) - 1
        return self._event("response.output_item.added", output_index=index, item=item)

    def _open_part(self, kind: str) -> str:
        assert self.open is not None
        out = self._close_part()
        key = PART_EVENTS[kind][2]
        part = objects.text_part("") if kind == "output_text" else {"type": kind, key: ""}
        self.open["content"].append(part)
        self.part = part
        index = len(self.open["content"]) - 1
        return out + self._event(
            "response.content_part.added", **self._where(), content_index=index, part=part
        )

    def _close_part(self) -> str:
        if self.open is None or self.part is None:
            return ""
        part, self.part = self.part, None
        _, done, key = PART_EVENTS[part["type"]]
        where = self._where() | {"content_index": len(self.open["content"]) - 1}
        extra: dict[str, Any] = {"logprobs": []} if part["type"] == "output_text" else {}
        out = self._event(done, **where, **{key: part[key]}, **extra)
        return out + self._event("response.content_part.done", **where, part=part)

    def _close_item(self, status: str) -> str:
        item = self.open
        if item is None:
            return ""
        out = self._close_part()
        if item["type"] == "function_call":
            out += self._event(
                "response.function_call_arguments.done",
                **self._where(),
                name=item["name"],
                arguments=item["arguments"],
            )
        item["status"] = status
        self.open, self.call_index = None, None
        index = len(self.items) - 1
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def _text(self, kind: str, text: str) -> str:
        """Text of a part kind: into the open part of that kind, or a new part (and item)."""
        out = ""
        item_kind = "reasoning" if kind == "reasoning_text" else "message"
        if self.open is None or self.open["type"] != item_kind:
            out += self._close_item("completed")
            ident = objects.item_id(self.job.id, item_kind, len(self.items))
            if item_kind == "reasoning":
                item = objects.reasoning_item(ident, None, "in_progress")
            else:
                item = objects.message_item(ident, [], "in_progress")
            out += self._open_item(item)
        if self.part is None or self.part["type"] != kind:
            out += self._open_part(kind)
        assert self.part is not None
        key = PART_EVENTS[kind][2]
        self.part[key] += text
        index = len(self.open["content"]) - 1 if self.open else 0
        extra: dict[str, Any] = {"logprobs": []} if kind == "output_text" else {}
        delta = self._event(
            PART_EVENTS[kind][0], **self._where(), content_index=index, delta=text, **extra
        )
        return out + delta

    def _tool_call(self, fragment: dict[str, Any]) -> str:
        out = ""
        index = int(fragment.get("index") or 0)
        function = fragment.get("function") or {}
        if self.call_index != index or self.open is None:
            out += self._close_item("completed")
            ident = objects.item_id(self.job.id, "function_call", len(self.items))
            call = {"id": fragment.get("id"), "function": {"name": function.get("name")}}
            out += self._open_item(objects.call_item(ident, call, "in_progress"))
            self.call_index = index
        assert self.open is not None
        arguments = function.get("arguments")
        if arguments:
            self.open["arguments"] += arguments
            out += self._event(
                "response.function_call_arguments.delta", **self._where(), delta=arguments
            )
        return out

    def _delta(self, choice: ChoiceDelta) -> str:
        delta = choice.get("delta") or {}
        out = ""
        for key, kind in DELTA_KEYS:
            if delta.get(key):
                out += self._text(kind, delta[key])
        if delta.get("refusal"):
            out += self._text("refusal", delta["refusal"])
        for fragment in delta.get("tool_calls") or []:
            out += self._tool_call(fragment)
        return out

    # -- entries -----------------------------------------------------------------------------

    def _start(self) -> str:
        self.started = True
        created = self._event("response.created", response=self._response("in_progress", output=[]))
        running = self._event(
            "response.in_progress", response=self._response("in_progress", output=[])
        )
        return created + running

    def render(self, entry_id: str, fields: dict[str, str]) -> str:
        """The SSE text for one entry (the terminal one ends the response)."""
        out = "" if self.started else self._start()
        kind = fields.get("t")
        if kind == "delta":
            if "d" in fields:
                return out + self._text("output_text", fields["d"])
            for choice in choices_of(fields):
                if int(choice.get("index") or 0) == 0:
                    out += self._delta(choice)
            return out
        if kind == "done":
            status, incomplete = objects.ending(fields.get("finish_reason"))
            out += self._close_item("completed" if status == "completed" else "incomplete")
            response = self._response(
                status,
                output=self.items,
                usage=objects.usage(usage_of(fields)),
                incomplete=incomplete,
                completed_at=int(time.time()) if status == "completed" else None,
            )
            return out + self._event(f"response.{status}", response=response)
        status, error = objects.failure(error_of(fields))
        out += self._close_item("incomplete")
        response = self._response(status, output=self.items, error=error)
        return out + self._event("response.failed", response=response)
