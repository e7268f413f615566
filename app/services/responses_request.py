"""An OpenAI Responses body (POST /v1/responses) checked and translated into a Chat
Completions body, which ChatCompletionRequest then validates like any chat body: every
provider, policy and check applies unchanged. Every error names the Responses field.

What Sluice cannot carry is refused with a 400 naming it (REFUSED); nothing is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from app import validation
from app.errors import APIError
from app.providers import ChatRequest
from app.services.chat_request import MODEL_FIELD, ChatCompletionRequest, Metadata
from app.validation import MAX_JSON_INT

# Responses parameters Sluice refuses whenever they are set (not null), with the reason.
REFUSED = {
    "conversation": "Sluice keeps no conversations: send the whole history in 'input', or "
    "'previous_response_id'",
    "prompt": "Sluice stores no prompt templates",
    "include": "Sluice returns no extra output data (logprobs, encrypted reasoning, sources)",
    "top_logprobs": "Sluice returns no logprobs on /v1/responses (use /v1/chat/completions)",
    "context_management": "Sluice does no context compaction",
    "max_tool_calls": "Sluice runs no built-in tools",
    "moderation": "Sluice runs no moderation",
    "prompt_cache_options": "Sluice sets no prompt cache breakpoints",
    "prompt_cache_retention": "Sluice sets no prompt cache retention",
}
# Responses parameters that are the Chat Completions parameter of the same name.
SAME = (
    "temperature",
    "top_p",
    "parallel_tool_calls",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
)
KNOWN = (
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "max_output_tokens",
    "stream",
    "stream_options",
    "reasoning",
    "store",
    "background",
    "truncation",
    "previous_response_id",
    *SAME,
    *REFUSED,
)
ROLES = ("user", "assistant", "system", "developer")
FORMAT_KEYS = {
    "text": ("type",),
    "json_object": ("type",),
    "json_schema": ("type", "name", "schema", "description", "strict"),
}
PART_TYPES = {
    "user": ("input_text", "input_image", "input_file"),
    "assistant": ("output_text", "refusal"),
}
_CHAT_PARAM = re.compile(r"^messages\[(\d+)\](.*)$")
_TOOL_CALL = re.compile(r"^\.tool_calls\[(\d+)\](.*)$")


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _unsupported(param: str, why: str) -> APIError:
    return _bad(f"'{param}' is not supported: {why}.", param, "unsupported_parameter")


def _unknown(param: str, known: tuple[str, ...]) -> APIError:
    return _bad(
        f"Unknown parameter: '{param}'. Known keys: {', '.join(known)}.", param, "unknown_parameter"
    )


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"'{param}' must be an object.", param, "invalid_type")
    return value


def _only(value: dict[str, Any], param: str, known: tuple[str, ...]) -> None:
    """Refuse any key of `value` (set to something other than null) not in `known`."""
    for key, item in value.items():
        if key not in known and item is not None:
            raise _unknown(f"{param}.{key}", known)


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"'{param}' must be a string.", param, "invalid_type")
    return value


@dataclass
class Translation:
    """The Chat Completions body, and where each of its messages came from in `input`."""

    body: dict[str, Any] = field(default_factory=dict)
    origins: list[str] = field(default_factory=list)  # messages[k] -> "input[i]"
    call_origins: dict[int, list[str]] = field(default_factory=dict)  # its tool_calls[j]

    def add(self, message: dict[str, Any], origin: str) -> None:
        self.body.setdefault("messages", []).append(message)
        self.origins.append(origin)

    def add_call(self, call: dict[str, Any], origin: str) -> None:
        """A function_call item, into the tool calls of the last (assistant) message."""
        self.body["messages"][-1]["tool_calls"].append(call)
        self.call_origins.setdefault(len(self.origins) - 1, []).append(origin)

    def responses_param(self, param: str | None) -> str | None:
        """The Responses field a chat parameter was translated from."""
        if param is None:
            return None
        match = _CHAT_PARAM.match(param)
        if match:
            k, rest = int(match[1]), match[2]
            origin = self.origins[k] if k < len(self.origins) else "input"
            call = _TOOL_CALL.match(rest)
            if call and int(call[1]) < len(self.call_origins.get(k, [])):
                origin, rest = self.call_origins[k][int(call[1])], call[2]
                rest = rest.replace(".function", "").replace(".id", ".call_id")
            rest = rest.replace(".image_url.url", ".image_url")
            return origin + rest.replace(".tool_call_id", ".call_id")
        if param == "messages":
            return "input"
        if param.startswith(("tools[", "tool_choice.function")):
            return param.replace(".function", "", 1)
        for chat, responses in CHAT_NAMES.items():
            if param == chat or param.startswith(chat + ".") or param.startswith(chat + "["):
                return responses + param[len(chat) :].replace(".function", "")
        return param


CHAT_NAMES = {
    "response_format.json_schema": "text.format",
    "response_format": "text.format",
    "max_completion_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
}


# -- input ---------------------------------------------------------------------------------


def _input_part(part: Any, where: str, role: str) -> dict[str, Any]:
    """One content part of an input message, as a chat content part."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _bad(f"'{where}' must be an object with a 'type'.", where, "invalid_type")
    kind = part["type"]
    allowed: tuple[str, ...] = ("input_text",)
    if role in PART_TYPES:
        allowed = PART_TYPES[role]
    if kind not in allowed:
        raise _bad(
            f"'{where}.type' {kind!r} is not a content part Sluice carries in a {role} message "
            f"(carried: {', '.join(allowed)}).",
            f"{where}.type",
        )
    if kind in ("input_text", "output_text"):
        _only(part, where, ("type", "text", "annotations", "logprobs"))
        if part.get("annotations") or part.get("logprobs"):
            raise _unsupported(f"{where}.annotations", "Sluice carries the text of a part only")
        return {"type": "text", "text": _string(part.get("text"), f"{where}.text")}
    if kind == "input_file":
        return _input_file(part, where)
    if kind == "refusal":
        _only(part, where, ("type", "refusal"))
        return {"type": "refusal", "refusal": _string(part.get("refusal"), f"{where}.refusal")}
    _only(part, where, ("type", "image_url", "detail", "file_id"))
    if part.get("file_id") is not None:
        raise _unsupported(
            f"{where}.file_id", "send the image as 'image_url' (http(s) or data URL)"
        )
    image: dict[str, Any] = {"url": _string(part.get("image_url"), f"{where}.image_url")}
    if part.get("detail") is not None:
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _input_file(part: dict[str, Any], where: str) -> dict[str, Any]:
    _only(part, where, ("type", "file_data", "filename", "file_id", "file_url"))
    for key in ("file_id", "file_url"):
        if part.get(key) is not None:
            raise _unsupported(f"{where}.{key}", "send the file inline as 'file_data'")
    file = {"file_data": _string(part.get("file_data"), f"{where}.file_data")}
    if part.get("filename") is not None:
        file["filename"] = _string(part["filename"], f"{where}.filename")
    return {"type": "file", "file": file}


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    _only(item, where, ("type", "role", "content", "id", "status"))
    role = item.get("role")
    if role not in ROLES:
        raise _bad(
            f"'{where}.role' must be one of {', '.join(ROLES)}; got {role!r}.", f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _bad(
            f"'{where}.content' must be a string or an array of content parts.",
            f"{where}.content",
            "invalid_type",
        )
    parts = [_input_part(part, f"{where}.content[{j}]", role) for j, part in enumerate(content)]
    return {"role": role, "content": parts}


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    _only(item, where, ("type", "call_id", "name", "arguments", "id", "status"))
    return {
        "id": _string(item.get("call_id"), f"{where}.call_id"),
        "type": "function",
        "function": {
            "name": _string(item.get("name"), f"{where}.name"),
            "arguments": _string(item.get("arguments"), f"{where}.arguments"),
        },
    }


def _function_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    _only(item, where, ("type", "call_id", "output", "id", "status"))
    output = item.get("output")
    if isinstance(output, list):
        output = [
            _input_part(part, f"{where}.output[{j}]", "tool") for j, part in enumerate(output)
        ]
    elif not isinstance(output, str):
        raise _bad(
            f"'{where}.output' must be a string or an array of input_text parts.",
            f"{where}.output",
            "invalid_type",
        )
    call_id = _string(item.get("call_id"), f"{where}.call_id")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    """A reasoning item's text (what `reasoning_content` carries to the provider)."""
    _only(item, where, ("type", "id", "summary", "content", "encrypted_content", "status"))
    if item.get("encrypted_content") is not None:
        raise _unsupported(f"{where}.encrypted_content", "Sluice decrypts no reasoning")
    if item.get("summary"):
        raise _unsupported(f"{where}.summary", "Sluice carries reasoning text, not summaries")
    content = item.get("content") or []
    if not isinstance(content, list):
        raise _bad(f"'{where}.content' must be an array.", f"{where}.content", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "reasoning_text":
            raise _bad(f"'{at}' must be a reasoning_text part.", at, "invalid_type")
        texts.append(_string(part.get("text"), f"{at}.text"))
    return "".join(texts)


def _stray_reasoning(where: str) -> APIError:
    return _bad(
        f"'{where}': a reasoning item must come just before the assistant message or "
        "function_call it led to.",
        where,
    )


def _input(value: Any, out: Translation) -> None:
    if isinstance(value, str):
        out.add({"role": "user", "content": value}, "input")
        return
    if not isinstance(value, list) or not value:
        raise _bad("'input' must be a string or a non-empty array of input items.", "input")
    open_turn = False  # the last message is an assistant one: a function_call joins it
    reasoning: tuple[str, str] | None = None  # (where, text) for the next assistant message
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"'{where}' must be an object.", where, "invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "reasoning":
            reasoning = (where, (reasoning[1] if reasoning else "") + _reasoning_text(item, where))
            continue
        message: dict[str, Any] | None = None
        if kind == "message":
            message = _message(item, where)
            out.add(message, where)
            open_turn = message["role"] == "assistant"
            if open_turn:
                message["tool_calls"] = []
        elif kind == "function_call":
            if not open_turn or reasoning is not None:
                message = {"role": "assistant", "content": None, "tool_calls": []}
                out.add(message, where)
                open_turn = True
            out.add_call(_function_call(item, where), where)
        elif kind == "function_call_output":
            out.add(_function_output(item, where), where)
            open_turn = False
        else:
            raise _bad(
                f"'{where}.type' {kind!r} is not an input item Sluice carries (carried: message, "
                "function_call, function_call_output, reasoning).",
                f"{where}.type",
            )
        if reasoning is not None:
            if message is None or message["role"] != "assistant":
                raise _stray_reasoning(reasoning[0])
            if reasoning[1]:
                message["reasoning_content"] = reasoning[1]
            reasoning = None
    if reasoning is not None:
        raise _stray_reasoning(reasoning[0])
    for message in out.body["messages"]:
        if message.get("tool_calls") == []:
            del message["tool_calls"]


# -- tools, tool choice, text format --------------------------------------------------------


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad("'tools' must be an array of tools.", "tools", "invalid_type")
    out = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        tool = _object(tool, where)
        kind = tool.get("type")
        if kind != "function":
            raise _bad(
                f"'{where}.type' {kind!r}: Sluice runs no built-in tools (web_search, "
                "file_search, code_interpreter, mcp...); only 'function' tools are carried.",
                f"{where}.type",
                "unsupported_parameter",
            )
        _only(tool, where, ("type", "name", "description", "parameters", "strict"))
        function = {"name": tool.get("name")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        return value
    choice = _object(value, "tool_choice")
    if choice.get("type") != "function":
        raise _bad(
            f"'tool_choice.type' {choice.get('type')!r} is not carried: use none, auto, "
            "required or {'type': 'function', 'name': ...}.",
            "tool_choice.type",
            "unsupported_parameter",
        )
    _only(choice, "tool_choice", ("type", "name"))
    return {"type": "function", "function": {"name": choice.get("name")}}


def _text(value: Any, chat: dict[str, Any]) -> None:
    text = _object(value, "text")
    _only(text, "text", ("format", "verbosity"))
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    if text.get("format") is None:
        return
    fmt = _object(text["format"], "text.format")
    kind = fmt.get("type")
    if kind not in FORMAT_KEYS:
        raise _bad(
            f"'text.format.type' must be one of {', '.join(FORMAT_KEYS)}.", "text.format.type"
        )
    _only(fmt, "text.format", FORMAT_KEYS[kind])
    if kind != "json_schema":
        chat["response_format"] = {"type": kind}
        return
    if not isinstance(fmt.get("schema"), dict):
        raise _bad(
            "'text.format.schema' must be a JSON schema object.",
            "text.format.schema",
            "missing_required" if fmt.get("schema") is None else "invalid_type",
        )
    spec = {k: v for k, v in fmt.items() if k != "type" and v is not None}
    chat["response_format"] = {"type": "json_schema", "json_schema": spec}


def _reasoning(value: Any, chat: dict[str, Any]) -> None:
    reasoning = _object(value, "reasoning")
    for key, item in reasoning.items():
        if key != "effort" and item is not None:
            raise _unsupported(
                f"reasoning.{key}", "Sluice carries 'reasoning.effort' only (no summaries)"
            )
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]


def _stream_options(value: Any) -> None:
    options = _object(value, "stream_options")
    _only(options, "stream_options", ("include_obfuscation",))
    if options.get("include_obfuscation"):
        raise _unsupported(
            "stream_options.include_obfuscation",
            "Sluice's events carry no 'obfuscation' field (send false or leave it out)",
        )


# -- the body -------------------------------------------------------------------------------


def _asks_nothing(key: str, value: Any) -> bool:
    """Whether a refused parameter is set to what asks for nothing (null, [], {}, no logprobs)."""
    return (
        value is None
        or (isinstance(value, list | dict) and not value)
        or (key == "top_logprobs" and value == 0 and not isinstance(value, bool))
    )


def _refuse_unknown_or_uncarried(body: dict[str, Any]) -> None:
    for key, value in body.items():
        if key not in KNOWN:
            raise _unknown(key, KNOWN)
        if key in REFUSED and not _asks_nothing(key, value):
            raise _unsupported(key, REFUSED[key])
    if body.get("background"):
        raise _unsupported(
            "background",
            "send 'Prefer: respond-async' instead: the response is then queued and "
            "GET /v1/responses/{id} polls it",
        )
    if body.get("truncation") not in (None, "disabled"):
        raise _unsupported("truncation", "only 'disabled' (an input too long fails)")
    if "store" in body and not isinstance(body["store"], bool | None):
        raise _bad("'store' must be a boolean.", "store", "invalid_type")


def translate(body: Any, history: Sequence[dict[str, Any]] = ()) -> Translation:
    """The Chat Completions body a Responses body describes (a 400 naming a Responses field).

    `history`: the chat messages of the response `previous_response_id` names (its input and
    output), carried in after this body's instructions and before its input.
    """
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None, "invalid_json")
    _refuse_unknown_or_uncarried(body)
    out = Translation()
    chat = out.body
    chat["model"] = body.get("model")
    if body.get("instructions") is not None:
        instructions = _string(body["instructions"], "instructions")
        out.add({"role": "system", "content": instructions}, "instructions")
    if body.get("previous_response_id") is not None:
        _string(body["previous_response_id"], "previous_response_id")
    for message in history:
        out.add(dict(message), "previous_response_id")
    if body.get("input") is None:
        raise _bad(
            "'input' is required: a string or an array of items.", "input", "missing_required"
        )
    _input(body["input"], out)
    for key in SAME:
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("text") is not None:
        _text(body["text"], chat)
    if body.get("reasoning") is not None:
        _reasoning(body["reasoning"], chat)
    if body.get("stream") is not None:
        chat["stream"] = body["stream"]
    if body.get("stream_options") is not None:
        if not body.get("stream"):
            raise _bad("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        _stream_options(body["stream_options"])
    return out


def chat_request_of(body: Any, history: Sequence[dict[str, Any]] = ()) -> ChatRequest:
    """Translate a Responses body and validate it as the chat body it becomes."""
    translation = translate(body, history)
    try:
        try:
            return ChatCompletionRequest.model_validate(translation.body).request
        except ValidationError as exc:
            raise validation.validation_error(exc) from None
    except APIError as exc:
        param = translation.responses_param(exc.param)
        if exc.param and param != exc.param:
            exc.message = exc.message.replace(exc.param, str(param))
        exc.param = param
        raise


RESPONSES_EXAMPLE: dict[str, Any] = {"model": "mock/echo", "input": "hi", "max_output_tokens": 16}
REFUSED_NOTE = "Refused with a 400 when set: " + ", ".join(REFUSED) + "."


class ResponsesRequest(BaseModel):
    """OpenAI's Responses body (POST /v1/responses), run as a chat job. Every field is
    carried or refused with a 400 naming it; a key not named here is refused."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [RESPONSES_EXAMPLE], "description": REFUSED_NOTE},
    )

    model: str = MODEL_FIELD
    input: str | list[dict[str, Any]] = Field(
        description="a string, or items: message (input_text / input_image / input_file / "
        "output_text / refusal parts), function_call, function_call_output"
    )
    instructions: str | None = Field(None, description="a leading system message")
    tools: list[dict[str, Any]] | None = Field(None, description="function tools only")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = Field(
        None, description="`format`: text, json_object or json_schema; `verbosity`"
    )
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_JSON_INT)
    stream: bool | None = None
    stream_options: dict[str, Any] | None = Field(
        None, description="`include_obfuscation`: false only"
    )
    metadata: Metadata | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    reasoning: dict[str, Any] | None = Field(None, description="`effort` only")
    store: bool | None = Field(None, description="Sluice keeps every job: GET works either way")
    background: bool | None = Field(None, description="false only: send Prefer: respond-async")
    truncation: str | None = Field(None, description="'disabled' only")
    previous_response_id: str | None = Field(
        None, description="continue that response: its input and output come first"
    )

    _request: ChatRequest | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _as_chat(
        cls, data: Any, handler: ModelWrapValidatorHandler[ResponsesRequest], info: ValidationInfo
    ) -> Any:
        history = (info.context or {}).get("history") or ()
        request = chat_request_of(data, history)  # every refusal, named, before the fields' types
        if isinstance(data, dict):  # the refused keys asked for nothing (else refused above)
            data = {k: v for k, v in data.items() if k not in REFUSED}
        parsed = handler(data)
        parsed._request = request
        return parsed

    @property
    def request(self) -> ChatRequest:
        """The ChatRequest this body runs as."""
        assert self._request is not None
        return self._request


def parse_responses_request(body: Any, history: Sequence[dict[str, Any]] = ()) -> ChatRequest:
    """Validate a Responses body into the ChatRequest it runs as (a 400 naming its field);
    `history` as for translate."""
    return validation.parse(ResponsesRequest, body, {"history": history}).request
