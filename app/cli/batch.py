"""`sluice submit` and `sluice results`: the batch channel from the terminal."""

from __future__ import annotations

import json
import mimetypes
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx

from app.cli.context import DEFAULT_URL, resolve_key
from app.models.batch import TERMINAL

UPLOAD_CHUNK = 256 * 1024


def _client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {resolve_key(key)}"}
    return httpx.Client(
        base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60, read=None)
    )


def _fail(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise click.ClickException(f"HTTP {response.status_code}: {message}")


class Multipart:
    """A multipart/form-data body streamed from disk, with its exact length known upfront."""

    def __init__(self, fields: dict[str, str], files: list[Path]) -> None:
        self.boundary = f"sluice-{secrets.token_hex(12)}"
        self.parts: list[bytes | Path] = []
        for name, value in fields.items():
            self.parts.append(self._head(f'name="{name}"') + value.encode() + b"\r\n")
        for path in files:
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            disposition = f'name="files"; filename="{path.name}"'
            self.parts += [self._head(disposition, ctype), path, b"\r\n"]
        self.parts.append(f"--{self.boundary}--\r\n".encode())

    def _head(self, disposition: str, ctype: str | None = None) -> bytes:
        head = f"--{self.boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        return (head + "\r\n").encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self.parts)

    def stream(self, progress: Any) -> Iterator[bytes]:
        for part in self.parts:
            if isinstance(part, bytes):
                progress.update(len(part))
                yield part
                continue
            with part.open("rb") as fh:
                while chunk := fh.read(UPLOAD_CHUNK):
                    progress.update(len(chunk))
                    yield chunk


def follow(client: httpx.Client, batch_id: str, total: int) -> dict[str, Any]:
    """Show a progress bar fed by the batch's SSE events until it ends; return the batch."""
    state: dict[str, Any] = {}
    done_before = 0
    with (
        click.progressbar(length=total, label="running  ", file=sys.stderr) as bar,
        client.stream("GET", f"/v1/document-batches/{batch_id}/events") as response,
    ):
        _fail(response)
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            state = json.loads(line[6:])
            counts = state["counts"]
            done = sum(counts.get(k, 0) for k in ("succeeded", "failed", "cancelled", "expired"))
            bar.update(done - done_before)
            done_before = done
            if state["status"] in TERMINAL:
                break
    return state


def url_option(f: Any) -> Any:
    f = click.option(
        "--key",
        default=None,
        help="API key (default: $SLUICE_API_KEY or $SLUICE_HOME/dev-admin-key).",
    )(f)
    return click.option(
        "--url", envvar="SLUICE_URL", default=DEFAULT_URL, show_default=True, help="Sluice URL."
    )(f)


@click.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--instructions", "-i", required=True, help="The system prompt for every document.")
@click.option("--model", "-m", default="mock/echo", show_default=True)
@click.option("--prompt-template", default=None, help="User prompt with a {document} placeholder.")
@click.option("--max-tokens", type=int, default=None)
@click.option("--wait", is_flag=True, help="Follow the batch with a progress bar until it ends.")
@url_option
def submit(
    files: tuple[Path, ...],
    instructions: str,
    model: str,
    prompt_template: str | None,
    max_tokens: int | None,
    wait: bool,
    url: str,
    key: str | None,
) -> None:
    """Upload FILES (.txt .md .html .pdf .docx .jsonl) as one document batch; print its id."""
    fields = {"model": model, "instructions": instructions}
    if prompt_template:
        fields["prompt_template"] = prompt_template
    if max_tokens is not None:
        fields["max_tokens"] = str(max_tokens)
    body = Multipart(fields, list(files))
    with _client(url, key) as client:
        with click.progressbar(length=len(body), label="uploading", file=sys.stderr) as bar:
            response = client.post(
                "/v1/document-batches",
                content=body.stream(bar),
                headers={"Content-Type": body.content_type, "Content-Length": str(len(body))},
            )
        _fail(response)
        batch = response.json()
        click.echo(batch["id"])
        counts = batch["counts"]
        click.echo(f"{counts['total']} documents queued ({batch['route']['rule']})", err=True)
        if wait:
            batch = follow(client, batch["id"], counts["total"])
            c = batch["counts"]
            click.echo(
                f"{batch['status']}: {c['succeeded']} succeeded, {c['failed']} failed,"
                f" {c['cancelled']} cancelled, {c.get('expired', 0)} expired"
                f" — `sluice results {batch['id']}`",
                err=True,
            )
            if batch["status"] != "completed":
                sys.exit(1)


@click.command()
@click.argument("batch_id")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write JSONL here (default: stdout).",
)
@click.option("--status", default=None, help="Only documents with this status.")
@url_option
def results(
    batch_id: str, output: Path | None, status: str | None, url: str, key: str | None
) -> None:
    """Download a batch's results as JSONL (one line per document)."""
    params = {"status": status} if status else {}
    with (
        _client(url, key) as client,
        client.stream("GET", f"/v1/document-batches/{batch_id}/results", params=params) as response,
    ):
        if response.status_code >= 400:
            response.read()
            _fail(response)
        sink = output.open("wb") if output else sys.stdout.buffer
        lines = 0
        try:
            for chunk in response.iter_bytes():
                sink.write(chunk)
                lines += chunk.count(b"\n")
        finally:
            if output:
                sink.close()
        if output:
            click.echo(f"{lines} results written to {output}", err=True)
