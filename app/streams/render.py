"""Log entries -> OpenAI `chat.completion.chunk` SSE events, for one job."""

from __future__ import annotations

import json

from app import sse


class ChunkRenderer:
    """Renders one job's entries as the chunks OpenAI's API streams (role on the first)."""

    def __init__(self, job_id: str, model: str, created: int, include_usage: bool) -> None:
        self.include_usage = include_usage
        head = {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk"}
        head |= {"created": created, "model": model, "system_fingerprint": None}
        base = json.dumps(head)[:-1]
        tail = ',"usage":null}' if include_usage else "}"
        self._base = base
        self._tail = tail
        self._delta_pre = base + ',"choices":[{"index":0,"delta":{"content":'
        self._role_pre = base + ',"choices":[{"index":0,"delta":{"role":"assistant","content":'
        self._delta_post = '},"logprobs":null,"finish_reason":null}]' + tail
        self.started = False

    def _choice(self, delta: str, finish: str | None) -> str:
        finish_json = json.dumps(finish)
        return (
            f'{self._base},"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
            f'"finish_reason":{finish_json}}}]{self._tail}'
        )

    def render(self, entry_id: str, fields: dict[str, str]) -> str:
        """The SSE text for one entry; a terminal entry also carries `data: [DONE]`."""
        kind = fields.get("t")
        if kind == "delta":
            pre = self._delta_pre if self.started else self._role_pre
            self.started = True
            text = json.dumps(fields.get("d", ""))  # ASCII: no U+2028 for splitlines()
            return sse.frame(f"{pre}{text}{self._delta_post}", ident=entry_id)
        chunks: list[str] = []
        if kind == "done":
            if not self.started:
                chunks.append(self._choice('{"role":"assistant","content":""}', None))
                self.started = True
            chunks.append(self._choice("{}", fields.get("finish_reason") or "stop"))
            if self.include_usage:
                usage = fields.get("usage") or "{}"
                chunks.append(f'{self._base},"choices":[],"usage":{usage}}}')
        else:
            chunks.append(f'{{"error":{fields.get("error") or "{}"}}}')
        out = "".join(sse.frame(chunk) for chunk in chunks)
        return out + sse.frame("[DONE]", ident=entry_id or None)
