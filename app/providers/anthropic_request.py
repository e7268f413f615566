"""An OpenAI chat request as an Anthropic Messages request; Unsupported for what has no match.

Tools and tool_choice are translated, tool results become `tool_result` blocks, images
and PDFs become image / document blocks, `response_format` (json_object / json_schema)
becomes a forced tool whose input is the answer, `reasoning_effort` a thinking budget,
`strict` (on a tool or a json_schema) Anthropic's strict tool use. OpenAI's `metadata` is
Sluice's own: it stays on the job (Anthropic's `metadata` takes only `user_id`, from `user`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from app.providers.base import ChatRequest, Unsupported
from app.providers.messages import content_text, parse_data_url

JSON_OBJECT_TOOL = "json_object"
THINKING_BUDGETS = {"none": 0, "minimal": 0, "low": 1024, "medium": 2048, "high": 4096}
SERVICE_TIERS = {"auto": "auto", "default": "standard_only"}
# options with no Anthropic equivalent, accepted only at the value that changes nothing
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "store": (False,),
    "modalities": (["text"],),
}
HANDLED = ("parallel_tool_calls", "reasoning_effort", "service_tier")
# Anthropic's strict tool use (grammar-constrained tool input) is behind this beta header
STRICT_TOOLS_BETA = "structured-outputs-2025-11-13"


@dataclass(frozen=True)
class Translated:
    """The Messages API keyword arguments, and the forced tool that carries a JSON answer."""

    params: dict[str, Any]
    format_tool: str | None = None


def _refuse(param: str, provider: str, why: str = "") -> Unsupported:
    detail = f": {why}" if why else ""
    return Unsupported(param, f"'{param}' is not supported by provider '{provider}'{detail}.")


def _image(image: dict[str, Any], where: str, provider: str) -> dict[str, Any]:
    if image.get("detail") not in (None, "auto"):
        raise _refuse(f"{where}.image_url.detail", provider, "only 'auto' has an equivalent")
    url = str(image.get("url"))
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    data = parse_data_url(url)
    if data is None:
        raise _refuse(where, provider, "an image must be an http(s) or base64 data URL")
    return {"type": "image", "source": {"type": "base64", "media_type": data[0], "data": data[1]}}


def _document(file: dict[str, Any], where: str, provider: str) -> dict[str, Any]:
    data = parse_data_url(str(file.get("file_data") or ""))
    if data is None:
        raise _refuse(f"{where}.file", provider, "only inline `file_data` (a data URL) is")
    media_type, payload = data
    if media_type == "application/pdf":
        source = {"type": "base64", "media_type": media_type, "data": payload}
    elif media_type == "text/plain":
        try:
            text = base64.b64decode(payload, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _refuse(f"{where}.file.file_data", provider, "not base64 UTF-8 text") from None
        source = {"type": "text", "media_type": media_type, "data": text}
    else:
        raise _refuse(f"{where}.file", provider, f"files of type {media_type} are not")
    block: dict[str, Any] = {"type": "document", "source": source}
    if file.get("filename"):
        block["title"] = str(file["filename"])
    return block


def _blocks(content: Any, where: str, provider: str) -> str | list[dict[str, Any]]:
    """Message content as Anthropic content: a string when it is all text, else blocks."""
    if not isinstance(content, list):
        return content_text(content)
    if all(part.get("type") == "text" for part in content):
        return content_text(content)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind, at = part.get("type"), f"{where}.content[{j}]"
        if kind in ("text", "refusal"):
            blocks.append({"type": "text", "text": part.get(kind) or ""})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url") or {}, at, provider))
        elif kind == "file":
            blocks.append(_document(part.get("file") or {}, at, provider))
        else:
            raise _refuse(at, provider, f"content parts of type {kind!r} are not")
    return blocks


def _tool_use(call: dict[str, Any], where: str, provider: str) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        raise _refuse(f"{where}.function.arguments", provider, "arguments must be JSON") from None
    if not isinstance(arguments, dict):
        raise _refuse(f"{where}.function.arguments", provider, "arguments must be an object")
    return {
        "type": "tool_use",
        "id": call.get("id"),
        "name": function.get("name"),
        "input": arguments,
    }


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def to_anthropic_messages(
    messages: list[dict[str, Any]], provider: str = "anthropic"
) -> tuple[str | None, list[dict[str, Any]]]:
    """Split OpenAI messages into Anthropic's `system` and alternating user/assistant turns."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, where = message.get("role"), f"messages[{i}]"
        content: str | list[dict[str, Any]]
        if role in ("system", "developer"):
            text = _blocks(message.get("content"), where, provider)
            if not isinstance(text, str):
                raise _refuse(f"{where}.content", provider, "a system message takes text only")
            if text:
                system.append(text)
            continue
        if role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": content_text(message.get("content")),
            }
            role, content = "user", [result]
        elif role == "assistant":
            content = _blocks(message.get("content"), where, provider)
            calls = message.get("tool_calls") or []
            if calls:
                uses = [
                    _tool_use(c, f"{where}.tool_calls[{k}]", provider) for k, c in enumerate(calls)
                ]
                content = _as_blocks(content) + uses
        else:
            role, content = "user", _blocks(message.get("content"), where, provider)
        if turns and turns[-1]["role"] == role:
            previous = turns[-1]["content"]
            if isinstance(previous, str) and isinstance(content, str):
                turns[-1]["content"] = previous + "\n\n" + content
            else:
                turns[-1]["content"] = _as_blocks(previous) + _as_blocks(content)
        else:
            turns.append({"role": role, "content": content})
    return ("\n\n".join(system) or None), turns


def _tools(request: ChatRequest, provider: str) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(request.tools or []):
        if tool.get("type") != "function":
            raise _refuse(f"tools[{i}].type", provider, "only function tools are")
        function = tool.get("function") or {}
        entry: dict[str, Any] = {
            "name": function.get("name"),
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            entry["description"] = function["description"]
        if function.get("strict"):
            entry["strict"] = True
        tools.append(entry)
    return tools


def _tool_choice(request: ChatRequest, provider: str) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice is None:
        result: dict[str, Any] | None = None
    elif choice in ("auto", "none"):
        result = {"type": choice}
    elif choice == "required":
        result = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        result = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    else:
        raise _refuse("tool_choice", provider, f"tool_choice {choice!r} has no equivalent")
    if request.options.get("parallel_tool_calls") is False and request.tools:
        result = result or {"type": "auto"}
        if result["type"] != "none":
            result["disable_parallel_tool_use"] = True
    return result


def _format_tool(request: ChatRequest, provider: str) -> dict[str, Any] | None:
    """The forced tool standing for `response_format` json_object / json_schema, if any."""
    fmt = request.response_format or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None
    if request.tools:
        raise _refuse("response_format", provider, "it cannot be combined with tools")
    if kind == "json_object":
        return {
            "name": JSON_OBJECT_TOOL,
            "description": "Answer with a JSON object.",
            "input_schema": {"type": "object", "additionalProperties": True},
        }
    spec = fmt.get("json_schema") or {}
    schema = spec.get("schema") or {"type": "object"}
    if schema.get("type") != "object":
        raise _refuse(
            "response_format.json_schema.schema", provider, "the schema must be an object"
        )
    tool = {"name": spec.get("name"), "input_schema": schema}
    tool["description"] = spec.get("description") or "Answer with JSON matching this schema."
    if spec.get("strict"):
        tool["strict"] = True
    return tool


def _thinking(request: ChatRequest, provider: str, max_tokens: int) -> tuple[dict[str, Any], int]:
    effort = request.options.get("reasoning_effort")
    if effort not in THINKING_BUDGETS:
        raise _refuse(
            "reasoning_effort", provider, f"expected one of {', '.join(THINKING_BUDGETS)}"
        )
    budget = THINKING_BUDGETS[effort]
    if not budget:
        return {}, max_tokens
    if request.limit is None:
        max_tokens += budget
    elif request.limit <= budget:
        raise _refuse(
            "max_completion_tokens" if request.max_completion_tokens else "max_tokens",
            provider,
            f"with reasoning_effort {effort!r} it must exceed the thinking budget ({budget})",
        )
    return {"thinking": {"type": "enabled", "budget_tokens": budget}}, max_tokens


def _check_thinking(
    request: ChatRequest, provider: str, messages: list[dict[str, Any]], choice: Any
) -> None:
    """What Anthropic answers 400 to with extended thinking on, refused here by name: a
    forced tool (tool_choice any / tool, and so response_format), a temperature other than
    1, a top_p under 0.95, and a final assistant turn without its thinking block (a tool
    loop or a prefill: the OpenAI format cannot carry the block back)."""
    why = "Anthropic's extended thinking (reasoning_effort) cannot be combined with"
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        forced = "response_format" if request.response_format else "a forced tool_choice"
        raise _refuse("reasoning_effort", provider, f"{why} {forced}")
    if request.temperature is not None and request.temperature != 1:
        raise _refuse("temperature", provider, f"{why} a temperature other than 1")
    if request.top_p is not None and request.top_p < 0.95:
        raise _refuse("top_p", provider, f"{why} a top_p under 0.95")
    last = next(
        (i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None
    )
    if last is not None and (
        last == len(messages) - 1
        or any(block.get("type") == "tool_use" for block in _as_blocks(messages[last]["content"]))
    ):
        raise _refuse(
            "reasoning_effort",
            provider,
            f"{why} a final assistant turn (a tool call or a prefill) whose thinking block"
            " it needs back",
        )


def _check_options(request: ChatRequest, provider: str) -> None:
    if request.choices != 1:
        raise _refuse("n", provider, "it returns one choice")
    if request.temperature is not None and request.temperature > 1:
        raise _refuse("temperature", provider, "it accepts 0 to 1")
    for key, value in request.options.items():
        if key in HANDLED or (key in NEUTRAL and value in NEUTRAL[key]):
            continue
        raise _refuse(key, provider)


def translate(request: ChatRequest, provider: str, default_max_tokens: int) -> Translated:
    """The Messages API call for a request (raises Unsupported naming the parameter)."""
    _check_options(request, provider)
    system, messages = to_anthropic_messages(request.messages, provider)
    max_tokens = request.limit or default_max_tokens
    params: dict[str, Any] = {"model": request.model, "messages": messages}
    extra: dict[str, Any] = {}
    if "reasoning_effort" in request.options:
        thinking, max_tokens = _thinking(request, provider, max_tokens)
        extra.update(thinking)
    params["max_tokens"] = max_tokens
    if system:
        params["system"] = system
    if request.stop:
        params["stop_sequences"] = request.stop
    if request.user:
        params["metadata"] = {"user_id": request.user}
    tools = _tools(request, provider)
    choice = _tool_choice(request, provider)
    format_tool = _format_tool(request, provider)
    if format_tool is not None:
        tools, choice = [format_tool], {"type": "tool", "name": format_tool["name"]}
    if tools:
        extra["tools"] = tools
        if any(tool.get("strict") for tool in tools):
            params["extra_headers"] = {"anthropic-beta": STRICT_TOOLS_BETA}
    if choice is not None and tools:  # Anthropic takes a tool_choice only beside tools
        extra["tool_choice"] = choice
    if extra.get("thinking"):
        _check_thinking(request, provider, messages, choice)
    tier = request.options.get("service_tier")
    if tier is not None:
        if tier not in SERVICE_TIERS:
            raise _refuse("service_tier", provider, f"expected one of {', '.join(SERVICE_TIERS)}")
        extra["service_tier"] = SERVICE_TIERS[tier]
    sampling = {"temperature": request.temperature, "top_p": request.top_p}
    extra.update({k: v for k, v in sampling.items() if v is not None})
    if extra:
        params["extra_body"] = extra
    return Translated(params, format_tool["name"] if format_tool else None)
