"""Log entries -> OpenAI `chat.completion.chunk` SSE events, for one job."""

from __future__ import annotations

import json
from typing import Any

from app import sse
from app.streams.entries import ChoiceDelta, choices_of, finishes_of


class ChunkRenderer:
    """Renders one job's entries as the chunks OpenAI's API streams.

    Each choice's first chunk carries `role: assistant` (a resumed relay's never does);
    the terminal entry gives each choice its finish chunk, then usage, then `[DONE]`.
    """

    def __init__(self, job_id: str, model: str, created: int, include_usage: bool) -> None:
        self.include_usage = include_usage
        head: dict[str, Any] = {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk"}
        head |= {"created": created, "model": model, "system_fingerprint": None}
        base = json.dumps(head)[:-1]
        tail = ',"usage":null}' if include_usage else "}"
        self._base = base
        self._tail = tail
        self._delta_pre = base + ',"choices":[{"index":0,"delta":{"content":'
        self._role_pre = base + ',"choices":[{"index":0,"delta":{"role":"assistant","content":'
        self._delta_post = '},"logprobs":null,"finish_reason":null}]' + tail
        self._started: set[int] = set()
        self.resumed = False  # the client has had the start of every choice

    def _has_started(self, index: int) -> bool:
        return self.resumed or index in self._started

    def _chunk(self, choices: list[ChoiceDelta]) -> str:
        out = []
        for choice in choices:
            index, delta = choice["index"], choice["delta"]
            if not self._has_started(index):
                delta = {"role": "assistant", "content": delta.get("content"), **delta}
                self._started.add(index)
            entry = {"index": index, "delta": delta, "logprobs": choice.get("logprobs")}
            out.append(entry | {"finish_reason": choice.get("finish_reason")})
        return f'{self._base},"choices":{json.dumps(out, separators=(",", ":"))}{self._tail}'

    def render(self, entry_id: str, fields: dict[str, str]) -> str:
        """The SSE text for one entry; a terminal entry also carries `data: [DONE]`."""
        kind = fields.get("t")
        if kind == "delta":
            if "d" in fields:  # choice 0's content: the hot path, no JSON parse
                pre = self._delta_pre if self._has_started(0) else self._role_pre
                self._started.add(0)
                text = json.dumps(fields["d"])  # ASCII: no U+2028 for splitlines()
                return sse.frame(f"{pre}{text}{self._delta_post}", ident=entry_id)
            return sse.frame(self._chunk(choices_of(fields)), ident=entry_id)
        chunks: list[str] = []
        if kind == "done":
            for index, reason in sorted(finishes_of(fields).items()):
                if not self._has_started(index):
                    chunks.append(self._chunk([{"index": index, "delta": {"content": ""}}]))
                finish = {"index": index, "delta": {}, "finish_reason": reason}
                chunks.append(self._chunk([finish]))
            if self.include_usage:
                usage = fields.get("usage") or "{}"
                chunks.append(f'{self._base},"choices":[],"usage":{usage}}}')
        else:
            chunks.append(f'{{"error":{fields.get("error") or "{}"}}}')
        out = "".join(sse.frame(chunk) for chunk in chunks)
        return out + sse.frame("[DONE]", ident=entry_id or None)
