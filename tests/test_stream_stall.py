"""The end of a stream is never late: no relay waits on its lease poll to see the end."""

from __future__ import annotations

import time

import httpx

PROMPT = "one two three four five"  # mock/echo answers it in five tokens


def _timed_stream(client: httpx.Client, include_usage: bool) -> tuple[float, str]:
    """One short stream; (seconds from its last delta to `[DONE]`, the text)."""
    body = {
        "model": "mock/echo",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": include_usage},
    }
    last_delta = None
    text = ""
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "data: [DONE]":
                assert last_delta is not None
                return time.monotonic() - last_delta, text
            if line.startswith("data: ") and '"content":' in line:
                last_delta = time.monotonic()
                text += line.split('"content":', 1)[1].split('"')[1]
    raise AssertionError("the stream ended without [DONE]")


def test_done_follows_the_last_delta_at_once(client: httpx.Client) -> None:
    gaps = []
    for i in range(200):
        gap, text = _timed_stream(client, include_usage=i % 2 == 0)
        assert text.split() == PROMPT.split()
        gaps.append(gap)
    late = [round(g, 3) for g in gaps if g > 0.25]
    assert not late, f"{len(late)} of 200 streams ended late: {late}"


def test_non_stream_calls_answer_at_once(client: httpx.Client) -> None:
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": PROMPT}]}
    slow = []
    for _ in range(100):
        started = time.monotonic()
        response = client.post("/v1/chat/completions", json=body)
        took = time.monotonic() - started
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == PROMPT
        if took > 1.0:
            slow.append(round(took, 3))
    assert not slow, f"{len(slow)} of 100 calls were slow: {slow}"
