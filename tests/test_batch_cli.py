"""`sluice submit` and `sluice results` against the live stack."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from app.cli import main
from tests.stack import Stack


def test_submit_wait_then_results(stack: Stack, api_key: str, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha document")
    (tmp_path / "b.md").write_text("beta *document*")
    lines = [json.dumps({"id": f"j{i}", "text": f"jsonl {i}"}) for i in range(5)]
    (tmp_path / "more.jsonl").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    common = ["--url", stack.url, "--key", api_key]
    files = [str(tmp_path / n) for n in ("a.txt", "b.md", "more.jsonl")]
    result = runner.invoke(
        main,
        [
            "submit",
            *files,
            "--instructions",
            "Repeat.",
            "--model",
            "openai/echo",
            "--wait",
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip().splitlines()[0]
    assert batch_id.startswith("batch_")
    assert "uploading" in result.stderr and "completed: 7 succeeded" in result.stderr

    out = tmp_path / "out.jsonl"
    result = runner.invoke(main, ["results", batch_id, "-o", str(out), *common])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["document_id"] for r in rows] == ["a.txt", "b.md", *[f"j{i}" for i in range(5)]]
    assert rows[0]["output"] == "alpha document"

    missing = runner.invoke(main, ["results", "batch_nope", *common])
    assert missing.exit_code != 0 and "404" in missing.output


def test_submit_reports_validation_errors(stack: Stack, api_key: str, tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "text": "ok"}\n{oops\n')
    result = CliRunner().invoke(
        main,
        ["submit", str(tmp_path / "bad.jsonl"), "-i", "x", "--url", stack.url, "--key", api_key],
    )
    assert result.exit_code != 0
    assert "HTTP 422" in result.output and "bad.jsonl line 2: invalid JSON" in result.output


def test_unreachable_server_is_one_clear_line() -> None:
    from click.testing import CliRunner

    from app.cli import main as sluice

    args = ["results", "batch_x", "--url", "http://127.0.0.1:1", "--key", "sk-sluice-x"]
    result = CliRunner().invoke(sluice, args)
    assert result.exit_code == 1
    assert "cannot reach Sluice" in result.output and "Traceback" not in result.output
