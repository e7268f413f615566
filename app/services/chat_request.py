"""An OpenAI Chat Completions body validated into the one ChatRequest (no Flask request needed).

Each parameter's shape is checked here (a 400 naming it); then the provider the model
names refuses what it cannot honour (a 400 naming the parameter and the provider).
Nothing is dropped: a key Sluice does not know rides along in `ChatRequest.options`,
which OpenAI-compatible providers forward and the others refuse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Annotated, Any, Literal, NotRequired, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

from app import limits, validation
from app.errors import APIError
from app.providers import ChatRequest, Provider, ProviderRegistry, Unsupported, providers
from app.providers.messages import is_image_url
from app.validation import (
    MAX_JSON_INT,
    MAX_MODEL_CHARS,
    METADATA_MAX_KEY_CHARS,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_CHARS,
    check_metadata,
    check_model_name,
)

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = get_args(Role)
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TOOL_CHOICES = ("none", "auto", "required")
_FORMATS = ("text", "json_object", "json_schema")
_STREAM_OPTIONS = ("include_usage", "include_obfuscation")


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _wrong_type(name: str, expected: str) -> APIError:
    return _bad(f"'{name}' must be {expected}.", name, "invalid_type")


# -- scalar parameters -----------------------------------------------------------------------


def _number(low: float, high: float) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong_type(name, "a number")
        if not math.isfinite(value) or not low <= value <= high:
            raise _bad(f"'{name}' must be between {low:g} and {high:g}, got {value!r}.", name)
        return value

    return check


def _integer(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(f"'{name}' must be an integer, got {value!r}.", name, "invalid_type")
        if value < low:
            raise _bad(f"'{name}' must be at least {low}, got {value}.", name)
        if high is not None and value > high:
            raise _bad(f"'{name}' must be at most {high}, got {value}.", name)
        return value

    return check


def _of_type(kind: type | tuple[type, ...], expected: str) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise _wrong_type(name, expected)
        if not isinstance(value, kind):
            raise _wrong_type(name, expected)
        return value

    return check


def _stop(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return list(value)
    raise _bad("'stop' must be a string or an array of up to 4 strings.", name, "invalid_type")


def _logit_bias(name: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _wrong_type(name, "an object mapping token ids to numbers")
    for token, bias in value.items():
        if not str(token).isdigit():
            raise _bad(f"'{name}' keys must be token ids, got {token!r}.", f"{name}.{token}")
        _number(-100, 100)(f"{name}.{token}", bias)
    return dict(value)


# -- tools and formats -----------------------------------------------------------------------


def _function_name(value: Any, param: str, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _bad(f"'{where}' must be a name of 1 to 64 letters, digits, _ or -.", param)
    return value


def _tools(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _wrong_type(name, "an array of tools")
    for i, tool in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise _bad(f"'{where}' must be an object with a 'type'.", where, "invalid_type")
        if tool["type"] != "function":
            continue  # e.g. OpenAI's custom tools: the provider decides
        _function(tool.get("function"), f"{where}.function")
    return value


def _function(function: Any, where: str) -> None:
    """One function definition (of `tools[i].function` or legacy `functions[i]`)."""
    if not isinstance(function, dict):
        raise _bad(f"'{where}' is required.", where, "missing_required")
    _function_name(function.get("name"), f"{where}.name", f"{where}.name")
    if "parameters" in function and not isinstance(function["parameters"], dict):
        raise _bad(f"'{where}.parameters' must be a JSON schema object.", f"{where}.parameters")
    if not isinstance(function.get("description", ""), str):
        raise _bad(f"'{where}.description' must be a string.", f"{where}.description")
    if not isinstance(function.get("strict", False), bool | None):
        raise _bad(f"'{where}.strict' must be a boolean.", f"{where}.strict")


def _functions(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _wrong_type(name, "an array")
    for i, function in enumerate(value):
        if not isinstance(function, dict):
            raise _wrong_type(f"{name}[{i}]", "an object")
        _function(function, f"{name}[{i}]")
    return value


def _tool_choice(name: str, value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        if value not in _TOOL_CHOICES:
            raise _bad(f"'{name}' must be one of {', '.join(_TOOL_CHOICES)} or an object.", name)
        return value
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _wrong_type(name, "a string or an object with a 'type'")
    if value["type"] == "function":
        function = value.get("function")
        _function_name(
            function.get("name") if isinstance(function, dict) else None,
            f"{name}.function.name",
            f"{name}.function.name",
        )
    return value


def _function_call(name: str, value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise _wrong_type(name, "a string or an object")
    _function_name(value.get("name"), f"{name}.name", f"{name}.name")
    return value


def _response_format(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") not in _FORMATS:
        raise _bad(f"'{name}.type' must be one of {', '.join(_FORMATS)}.", name)
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad(f"'{name}.json_schema' is required.", name, "missing_required")
        _function_name(spec.get("name"), f"{name}.json_schema.name", f"{name}.json_schema.name")
        if "schema" in spec and not isinstance(spec["schema"], dict):
            raise _bad(
                f"'{name}.json_schema.schema' must be a JSON schema object.",
                f"{name}.json_schema.schema",
            )
    return value


# Every Chat Completions parameter Sluice checks and carries, with its check. A key not in
# this table (and not model / messages / stream / stream_options) is carried unchecked.
PARAMETERS: dict[str, Callable[[str, Any], Any]] = {
    "max_tokens": _integer(1),
    "max_completion_tokens": _integer(1),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "stop": _stop,
    "user": _of_type(str, "a string"),
    "metadata": lambda name, value: check_metadata(value, param=name),
    "n": _integer(1, 128),
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _of_type(bool, "a boolean"),
    "response_format": _response_format,
    "seed": _integer(-(2**63)),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logit_bias": _logit_bias,
    "logprobs": _of_type(bool, "a boolean"),
    "top_logprobs": _integer(0, 20),
    "reasoning_effort": _of_type(str, "a string"),
    "service_tier": _of_type(str, "a string"),
    "store": _of_type(bool, "a boolean"),
    "modalities": _of_type(list, "an array of strings"),
    "audio": _of_type(dict, "an object"),
    "prediction": _of_type(dict, "an object"),
    "web_search_options": _of_type(dict, "an object"),
    "verbosity": _of_type(str, "a string"),
    "prompt_cache_key": _of_type(str, "a string"),
    "safety_identifier": _of_type(str, "a string"),
    "functions": _functions,
    "function_call": _function_call,
}


# -- messages --------------------------------------------------------------------------------


def _part(part: Any, where: str, role: str) -> None:
    """Check one content part's shape (unknown part types are the provider's to judge)."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _bad(f"'{where}' must be an object with a 'type'.", where, "invalid_type")
    kind = part["type"]
    if role in ("system", "developer", "tool") and kind != "text":
        raise _bad(f"'{where}' must be a text part in a {role} message.", where)
    if kind in ("text", "refusal"):
        if not isinstance(part.get(kind), str):
            raise _bad(f"'{where}.{kind}' must be a string.", f"{where}.{kind}", "invalid_type")
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str) or not is_image_url(url):
            raise _bad(
                f"'{where}.image_url.url' must be an http(s) URL or a base64 data URL.",
                f"{where}.image_url.url",
            )
    elif kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not all(
            isinstance(audio.get(k), str) for k in ("data", "format")
        ):
            raise _bad(
                f"'{where}.input_audio' must have 'data' (base64) and 'format'.",
                f"{where}.input_audio",
            )
    elif kind == "file":
        file = part.get("file")
        if not isinstance(file, dict) or not any(
            isinstance(file.get(k), str) for k in ("file_data", "file_id")
        ):
            raise _bad(f"'{where}.file' must have 'file_data' or 'file_id'.", f"{where}.file")


def _tool_calls(value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise _bad(f"'{where}' must be an array.", where, "invalid_type")
    for k, call in enumerate(value):
        at = f"{where}[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise _bad(
                f"'{at}' must have an 'id' and a 'function' with 'name' and 'arguments' strings.",
                at,
            )


def _message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise _bad(f"'{where}' must be an object.", where, "invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(
            f"'{where}.role' must be one of {', '.join(ROLES)}; got {role!r}.", f"{where}.role"
        )
    content = message.get("content")
    if role == "assistant" and message.get("tool_calls") is not None:
        _tool_calls(message["tool_calls"], f"{where}.tool_calls")
    elif content is None and role != "assistant":
        raise _bad(f"'{where}.content' is required.", f"{where}.content", "missing_required")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise _bad(
            f"'{where}.tool_call_id' is required in a tool message.",
            f"{where}.tool_call_id",
            "missing_required",
        )
    if content is not None and not isinstance(content, str | list):
        raise _bad(
            f"'{where}.content' must be a string or an array of content parts.",
            f"{where}.content",
            "invalid_type",
        )
    for j, part in enumerate(content if isinstance(content, list) else []):
        _part(part, f"{where}.content[{j}]", str(role))
    return message


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad("'messages' must be an array of message objects.", "messages", "invalid_type")
    if not value:
        raise _bad("'messages' must contain at least one message.", "messages")
    limits.check_array(value, "messages", "MAX_MESSAGES")
    return [_message(message, f"messages[{i}]") for i, message in enumerate(value)]


# -- the body --------------------------------------------------------------------------------


def _no_model() -> APIError:
    return _bad("'model' is required: a string like 'mock/echo'.", "model", "missing_required")


def _model(value: Any, registry: ProviderRegistry) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _no_model()
    check_model_name(value)
    provider, _, name = value.partition("/")
    if not provider or not name.strip():
        raise _bad(
            f"'model' must look like provider/model (e.g. mock/echo), got {value!r}.",
            "model",
            "model_not_found",
        )
    known = registry.names()
    if provider not in known:
        raise _bad(
            f"The model '{value}' does not exist: unknown provider '{provider}' "
            f"(known: {', '.join(sorted(known))}).",
            "model",
            "model_not_found",
        )
    return value


def _stream(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad("'stream' must be a boolean.", "stream", "invalid_type")
    return value


def _stream_options(options: Any) -> dict[str, bool]:
    """OpenAI's two keys, each checked; any other key is refused naming it."""
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
    for key, value in options.items():
        param = f"stream_options.{key}"
        if key not in _STREAM_OPTIONS:
            raise _bad(
                f"Unknown parameter: '{param}'. Known keys: {', '.join(_STREAM_OPTIONS)}.",
                param,
                "unknown_parameter",
            )
        if not isinstance(value, bool):
            raise _bad(f"'{param}' must be a boolean.", param, "invalid_type")
    if options.get("include_obfuscation"):  # Sluice adds no obfuscation padding to chunks
        raise _bad(
            "'stream_options.include_obfuscation': true is not supported; Sluice's stream "
            "chunks carry no 'obfuscation' field (send false or leave it out).",
            "stream_options.include_obfuscation",
            "unsupported_parameter",
        )
    return {"include_usage": bool(options.get("include_usage", False))}


def _only_when_streaming() -> APIError:
    return _bad(
        "'stream_options' is only allowed when 'stream' is true (on /v1/jobs also with "
        "'mode': 'stream', never with 'mode': 'batch').",
        "stream_options",
    )


def _cross_checks(record: Mapping[str, Any]) -> None:
    """Rules between parameters, as OpenAI applies them."""
    if record.get("top_logprobs") and not record.get("logprobs"):
        raise _bad("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    choice = record.get("tool_choice")
    if choice is not None and choice != "none" and not record.get("tools"):
        raise _bad("'tool_choice' is only allowed when 'tools' are given.", "tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        wanted = choice["function"]["name"]
        names = [(t.get("function") or {}).get("name") for t in record.get("tools") or []]
        if wanted not in names:
            raise _bad(f"'tool_choice' names '{wanted}', which is not in 'tools'.", "tool_choice")


# -- the model: what the route validates with and /openapi.json describes --------------------

CHAT_EXAMPLE: dict[str, Any] = {
    "model": "mock/echo",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 5,
}
MODEL_FIELD = Field(max_length=MAX_MODEL_CHARS, description="`provider/model`, e.g. `mock/echo`")
METADATA_SCHEMA: dict[str, Any] = {
    "maxProperties": METADATA_MAX_KEYS,
    "propertyNames": {"maxLength": METADATA_MAX_KEY_CHARS},
    "additionalProperties": {"type": "string", "maxLength": METADATA_MAX_VALUE_CHARS},
}
Metadata = Annotated[dict[str, str], Field(json_schema_extra=METADATA_SCHEMA)]


@with_config(ConfigDict(extra="allow"))
class Message(TypedDict):
    """One message (a dict as sent); keys beyond these ride along to the provider."""

    role: Role
    content: NotRequired[str | list[dict[str, Any]] | None]
    name: NotRequired[str]
    tool_calls: NotRequired[list[dict[str, Any]] | None]
    tool_call_id: NotRequired[str]


class StreamOptions(BaseModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None


def _registry(info: ValidationInfo) -> ProviderRegistry:
    registry = (info.context or {}).get("registry")
    return registry if isinstance(registry, ProviderRegistry) else providers()


class ChatCompletionRequest(BaseModel):
    """OpenAI's Chat Completions body; parameters Sluice does not know ride along to the
    provider (OpenAI-compatible ones) or are refused with a 400 naming them."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [CHAT_EXAMPLE]})

    model: str = MODEL_FIELD
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_JSON_INT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_JSON_INT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    user: str | None = None
    metadata: Metadata | None = None
    n: int | None = Field(None, ge=1, le=128)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=MAX_JSON_INT)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning_effort: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    _request: ChatRequest | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _a_body(cls, data: Any) -> Any:
        """An object; an absent model or messages is named by its own check."""
        if not isinstance(data, dict):
            raise _bad("The request body must be a JSON object.", None, "invalid_json")
        if data.get("model") is None:
            raise _no_model()
        if data.get("messages") is None:
            _messages(None)
        return data

    @field_validator("model", mode="wrap")
    @classmethod
    def _known_model(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> str:
        return str(handler(_model(value, _registry(info))))

    @field_validator("messages", mode="wrap")
    @classmethod
    def _checked_messages(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[Message]:
        messages: list[Message] = handler(_messages(value))
        return messages

    @field_validator("stream", mode="wrap")
    @classmethod
    def _checked_stream(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> bool | None:
        return None if value is None else bool(handler(_stream(value)))

    @field_validator("stream_options", mode="wrap")
    @classmethod
    def _checked_stream_options(
        cls, value: Any, handler: ValidatorFunctionWrapHandler
    ) -> StreamOptions | None:
        if value is None:
            return None
        options: StreamOptions = handler(_stream_options(value))
        return options

    def streams(self) -> bool:
        """Whether this body answers as a stream (what `stream_options` needs)."""
        return bool(self.stream)

    @field_validator(*PARAMETERS, mode="wrap")
    @classmethod
    def _checked_parameter(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """The parameter's check of PARAMETERS (its 400 as it is), then its declared type;
        the value is the check's, as sent (an integer temperature stays an integer)."""
        if value is None:
            return None
        name = str(info.field_name)
        value = PARAMETERS[name](name, value)
        handler(value)
        return value

    def record(self) -> dict[str, Any]:
        """The Chat Completions body as validated: every parameter set, then the unknown ones."""
        record: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages,
            "stream": bool(self.stream),
        }
        if self.stream_options is not None:
            record["stream_options"] = {"include_usage": self.stream_options.include_usage}
        # the fields in declaration order: a refusal names the same parameter each time
        for name, value in self.__dict__.items():
            if value is not None and name in PARAMETERS:
                record[name] = value
        for name, value in (self.model_extra or {}).items():
            if value is not None:
                record[name] = value
        return record

    @model_validator(mode="after")
    def _honoured(self, info: ValidationInfo) -> ChatCompletionRequest:
        """Rules between parameters; then the provider refuses what it cannot honour."""
        if self.stream_options is not None and not self.streams():
            raise _only_when_streaming()
        record = self.record()
        _cross_checks(record)
        request = ChatRequest.from_record(record)
        provider, bound = _registry(info).bind(request)
        try:
            provider.check(bound)
        except Unsupported as exc:
            raise _bad(exc.message, exc.param, "unsupported_parameter") from None
        self._request = request
        return self

    @property
    def request(self) -> ChatRequest:
        """The ChatRequest this body describes (built once, while validating)."""
        assert self._request is not None
        return self._request


def parse_chat_request(body: Any, registry: ProviderRegistry | None = None) -> ChatRequest:
    """Validate a Chat Completions body; raise APIError(400, param=...) naming what is wrong."""
    context = {"registry": registry} if registry is not None else None
    return validation.parse(ChatCompletionRequest, body, context).request


# -- many bodies: an input file's lines --------------------------------------------------------

_REQUEST_FIELDS = frozenset(item.name for item in fields(ChatRequest))
# What a body may hold and still be checked BodyChecker's short way: its parameters are
# these scalars (PARAMETERS order), each checked by its own PARAMETERS check and bound as
# its field declares; none of them takes part in _cross_checks.
_SHORT_PARAMETERS = tuple(
    name
    for name in PARAMETERS
    if name
    in (
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "user",
        "n",
        "seed",
        "presence_penalty",
        "frequency_penalty",
    )
)
_SHORT_KEYS = frozenset({"model", "messages", "stream", *_SHORT_PARAMETERS})
_SHORT_MESSAGE_KEYS = frozenset({"role", "content", "name"})
_SHORT_ROLES = ("system", "developer", "user", "assistant")  # a tool message needs more


class BodyChecker:
    """parse_chat_request's verdict on many bodies (an input file's lines), cheaper.

    A body of the common shape (a model a body already passed parse_chat_request with,
    messages of string content, a few scalar parameters) is checked here by the same
    rules, then by its provider; any other body, and any body a rule refuses, goes to
    parse_chat_request, which raises the same 400 naming what is wrong. A model's own
    checks depend on its name alone, so they are made once per name.
    """

    def __init__(self, registry: ProviderRegistry | None = None) -> None:
        self.registry = registry if registry is not None else providers()
        self._models: dict[str, tuple[Provider, str]] = {}  # model -> provider, its name
        self._max_messages = limits.setting("MAX_MESSAGES")

    def check(self, body: Any) -> ChatRequest:
        """The request as its provider sees it (bound), or parse_chat_request's APIError."""
        bound = self._short(body)
        if bound is None:
            request = parse_chat_request(body, self.registry)
            provider, bound = self.registry.bind(request)
            self._models[request.model] = (provider, bound.model)
        return bound

    def _short(self, body: Any) -> ChatRequest | None:
        """The bound request of a body of the common shape that passes every rule; None
        for any other body (parse_chat_request decides)."""
        if type(body) is not dict or not body.keys() <= _SHORT_KEYS:
            return None
        model = body.get("model")
        known = self._models.get(model) if type(model) is str else None
        messages = body.get("messages")
        if known is None or not isinstance(messages, list) or not self._plain(messages):
            return None
        stream = body.get("stream")
        if stream is not None and type(stream) is not bool:
            return None
        try:
            return self._bound(body, *known, messages, bool(stream))
        except Exception:  # a refusal (or any surprise): the long way meets it and answers
            return None

    def _bound(
        self,
        body: dict[str, Any],
        provider: Provider,
        model: str,
        messages: list[Any],
        stream: bool,
    ) -> ChatRequest | None:
        """The bound request, each parameter checked as the long way checks it, then checked
        by its provider (both raise on a refusal)."""
        values: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for name in _SHORT_PARAMETERS:
            value = body.get(name)
            if value is None:
                continue
            value = PARAMETERS[name](name, value)
            if type(value) is int and value > MAX_JSON_INT:  # the field's bound
                return None
            (values if name in _REQUEST_FIELDS else options)[name] = value
        request = ChatRequest(
            model=model, messages=list(messages), stream=stream, options=options, **values
        )
        provider.check(request)
        return request

    def _plain(self, messages: list[Any]) -> bool:
        """Whether messages are 1 to MAX_MESSAGES {role, content: str[, name: str]}."""
        if type(messages) is not list or not messages:
            return False
        if self._max_messages and len(messages) > self._max_messages:
            return False
        for message in messages:
            if type(message) is not dict or not message.keys() <= _SHORT_MESSAGE_KEYS:
                return False
            if message.get("role") not in _SHORT_ROLES or type(message.get("content")) is not str:
                return False
            if "name" in message and type(message["name"]) is not str:
                return False
        return True
