"""`sluice chat`: stream an answer to the terminal."""

from __future__ import annotations

import json
import time

import click
import httpx

from app.cli.context import DEFAULT_URL, resolve_key


def _error_text(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:500]


@click.command("chat")
@click.argument("prompt")
@click.option("--model", "-m", default="mock/echo", show_default=True, help="provider/model")
@click.option(
    "--url", envvar="SLUICE_URL", default=DEFAULT_URL, show_default=True, help="Sluice base URL."
)
@click.option("--key", default=None, help="API key (default: SLUICE_API_KEY or the dev key).")
@click.option("--max-tokens", type=int, default=None)
def chat(prompt: str, model: str, url: str, key: str | None, max_tokens: int | None) -> None:
    """Stream the answer to PROMPT as it arrives; print TTFT and tokens/s at the end."""
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens:
        body["max_tokens"] = max_tokens
    headers = {"Authorization": f"Bearer {resolve_key(key)}"}
    started = time.monotonic()
    first: float | None = None
    usage: dict[str, int] = {}
    deltas = 0
    try:
        with (
            httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=None) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            if response.status_code != 200:
                raise click.ClickException(
                    f"HTTP {response.status_code}: {_error_text(response.read())}"
                )
            job_id = response.headers.get("x-sluice-job-id", "?")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    click.echo()
                    raise click.ClickException(f"stream error: {chunk['error'].get('message')}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = choice.get("delta", {}).get("content")
                    if text:
                        if first is None:
                            first = time.monotonic()
                        deltas += 1
                        click.echo(text, nl=False)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach Sluice at {url}: {exc}") from None
    ended = time.monotonic()
    click.echo()
    tokens = usage.get("completion_tokens") or deltas
    ttft = f"{(first - started) * 1000:.0f} ms" if first else "n/a"
    rate = tokens / (ended - first) if first and ended > first else 0.0
    click.echo(f"[job {job_id}] TTFT {ttft}, {tokens} tokens, {rate:.1f} tokens/s", err=True)
