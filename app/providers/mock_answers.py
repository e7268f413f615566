"""What the mock provider says: readable words, JSON matching a schema, and tool calls."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "by",
    "this",
    "from",
    "at",
    "be",
    "are",
    "was",
    "or",
    "an",
    "which",
    "stream",
    "batch",
    "token",
    "worker",
    "queue",
    "model",
    "river",
    "sluice",
    "gate",
    "water",
    "flow",
    "channel",
    "tenant",
    "job",
    "result",
    "signal",
    "delta",
    "latency",
    "quiet",
    "bright",
    "careful",
    "simple",
    "steady",
    "quick",
    "gentle",
    "open",
    "measure",
    "carry",
    "answer",
    "build",
    "write",
    "read",
    "return",
    "pass",
    "hold",
    "move",
    "shape",
    "follow",
    "keep",
    "turn",
    "light",
    "stone",
    "field",
    "story",
    "reason",
    "moment",
    "window",
    "garden",
    "engine",
    "harbor",
    "lantern",
    "meadow",
]


def mock_words(seed_text: str, count: int) -> list[str]:
    """Deterministic readable words (with some punctuation) derived from `seed_text`."""
    rng = _rng(seed_text)
    words: list[str] = []
    capitalize = True
    for i in range(count):
        word = rng.choice(WORDS)
        if capitalize:
            word = word.capitalize()
            capitalize = False
        if i == count - 1:
            word += "."
        elif rng.random() < 0.08:
            word += "."
            capitalize = True
        elif rng.random() < 0.08:
            word += ","
        words.append(word)
    return words


def split_tokens(text: str) -> list[str]:
    """Split text into word-ish deltas (leading whitespace attached) that join back to it."""
    return re.findall(r"\s*\S+|\s+$", text) if text else []


def _rng(seed_text: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big"))


def mock_value(schema: Any, prompt: str, depth: int = 0) -> Any:
    """A deterministic value valid for a (simple) JSON schema; strings carry the prompt."""
    if not isinstance(schema, dict) or depth > 8:
        return prompt
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return mock_value(schema[key][0], prompt, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {k: mock_value(v, prompt, depth + 1) for k, v in properties.items()}
    if kind == "array":
        return [mock_value(schema.get("items"), prompt, depth + 1)]
    if kind == "integer":
        return len(prompt.split())
    if kind == "number":
        return len(prompt.split()) / 2
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return prompt


def json_answer(response_format: dict[str, Any], prompt: str, words: list[str]) -> str:
    """The mock's answer under `json_object` / `json_schema`: valid JSON text."""
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {"type": "object"}
        return json.dumps(mock_value(schema, prompt), ensure_ascii=False)
    return json.dumps({"answer": " ".join(words)}, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCall:
    """One call the mock makes: the tool and its JSON arguments."""

    id: str
    name: str
    arguments: str


def tool_call(tools: list[dict[str, Any]], choice: Any, prompt: str, seed: str) -> ToolCall:
    """Call the tool `choice` names (else the first) with arguments derived from the prompt."""
    wanted = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    functions = [t.get("function") or {} for t in tools if t.get("type") == "function"]
    function = next((f for f in functions if f.get("name") == wanted), functions[0])
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    arguments = json.dumps(mock_value(schema, prompt), ensure_ascii=False)
    call_id = "call_" + hashlib.sha256(f"{seed}\n{arguments}".encode()).hexdigest()[:24]
    return ToolCall(call_id, str(function.get("name")), arguments)


def fragments(text: str, size: int = 8) -> list[str]:
    """Split text into pieces of `size` characters (tool-call arguments arrive like this)."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def token_logprobs(token: str, top: int) -> dict[str, Any]:
    """A logprobs `content` entry: the mock is certain of its token; alternatives trail far."""
    alternatives = [token] + [w for w in _rng(token).sample(WORDS, 5) if w != token]
    return {
        "token": token,
        "logprob": 0.0,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": -10.0 * rank, "bytes": list(t.encode())}
            for rank, t in enumerate(alternatives[:top])
        ],
    }
