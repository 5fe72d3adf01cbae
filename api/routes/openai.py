"""OpenAI-compatible chat completions, and legacy completions of a rendered prompt (`POST /v1/completions`, as vLLM
serves them). Each request is a job like any other: queued, batched, pollable.

The completion id is `chatcmpl-<job id>`, and the `X-Job-Id` header names the job, so a
completion can be polled at `GET /v1/jobs/{job id}` or cancelled at `DELETE /v1/jobs/{job id}`.
Messages are rendered by the worker with the model's template. A client that leaves before the
end (a stream closed, or a plain request abandoned) cancels the job, unless the request says
`"keep_on_disconnect": true` (llava-queue's field; with the openai package, `extra_body`).
Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with `code` the
llava-queue error code; a bad request is a 400, as OpenAI answers.
"""

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

import redis
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from api.auth import KeyBeforeBody
from api.channel_hub import ChannelHub
from api.deps import ApiKey, Hub, IdempotencyKey, Registry, Store, Submissions
from api.errors import MODEL_NOT_FOUND, ApiError, body_not_json, error_body, store_unavailable
from api.routes.llava import JOB_ID_HEADER, cancel_unless_ended
from api.routes.models import model_away, returning_models, served_models
from api.stream import FollowingResponse, JobGone, JobNotFound, ServerStopping, follow_job, with_keepalives
from api.submission import Submitter, check_unicode
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import (CONTEXT_OVERFLOW_MSG, EXHAUSTED_ERROR, MAX_IMAGES, MAX_MESSAGES, ErrorCode,
                             GenerateRequest, InvalidRequest, check_images, context_overflowed, data_url_parts,
                             describe_validation_error, max_new_tokens_cap, one_submission, parse_request,
                             stop_of_strings)

log = logging.getLogger("llava_queue.api")

COMPLETION_ID_PREFIX = "chatcmpl-"
TEXT_COMPLETION_ID_PREFIX = "cmpl-"  # a legacy completion's (`POST /v1/completions`), as OpenAI's and vLLM's


def job_id_of(job_or_completion_id: str) -> str:
    """The job id of a job id or of a completion's id (`chatcmpl-<job id>`, `cmpl-<job id>`): every route that takes
    a job id takes either."""
    return job_or_completion_id.removeprefix(COMPLETION_ID_PREFIX).removeprefix(TEXT_COMPLETION_ID_PREFIX)


# How a job that did not succeed is answered: HTTP status and error type, by llava-queue error code.
_JOB_ERRORS = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.CANCELLED: (409, "cancelled"),
    ErrorCode.EXPIRED: (504, "expired"),
    ErrorCode.OVERLOADED: (503, "overloaded"),
}
# The openai package retries a 409 (and any 5xx) by sending the request again, which would run a job that was
# cancelled on purpose once more, or one whose workers died running it (EXHAUSTED_ERROR) on more workers: this
# header (which the package obeys) says not to.
_NOT_RETRIED = {"x-should-retry": "false"}


class OpenAIRoute(KeyBeforeBody):
    """A route whose invalid requests are answered 400, as OpenAI does (the rest of the API uses 422)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                untyped = body_not_json(request, list(exc.errors()))
                if untyped:
                    raise untyped from None
                raise _invalid_request(exc.errors()) from None

        return route


def _openai_path(loc: tuple) -> tuple:
    """A field's location as OpenAI names it: `messages[0].role` (one part, for describe_validation_error)."""
    path = ""
    for part in loc:
        if part == "body":
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return (path,) if path else ()


def _invalid_request(errors: Sequence[dict]) -> ApiError:
    """The 400 OpenAI answers for pydantic's validation `errors` of a request, naming the field as OpenAI does."""
    invalid = describe_validation_error([{**error, "loc": _openai_path(error.get("loc", ()))} for error in errors])
    return ApiError(400, invalid.message, param=invalid.param)


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


class ChatMessage(BaseModel):
    """One message. `content` is a string or a list of parts: `{"type": "text", "text"}`,
    `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (user messages only) and
    `{"type": "refusal", "refusal"}` (assistant messages only)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_or_parts(cls, content: Any, info: ValidationInfo) -> Any:
        """One error naming `content` (pydantic's would name each member of the union: `content.str`, ...).
        Left out, it is empty text; null only in an assistant message, as OpenAI and vLLM take it."""
        if content is None:
            role = info.data.get("role")
            if role is not None and role != "assistant":
                raise ValueError(f"must not be null in a {role} message: give a string or a list of content parts")
            return content
        if isinstance(content, str):
            return content
        if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
            raise ValueError('must be a string or a list of content parts ({"type": "text", "text": ...})')
        return content


def not_boolean(value: Any) -> str | None:
    """Why `value` is not a boolean field's value (true, false, or null where the field takes it), or None when it
    is: OpenAI refuses any other ("yes", 1), which pydantic took for true."""
    if value is None or isinstance(value, bool):
        return None
    kinds = {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return f"must be a boolean (true or false), got {kinds.get(type(value), type(value).__name__)}"


def _boolean(value: Any) -> Any:
    """A boolean field's validator (mode="before"): refuses what `not_boolean` refuses."""
    refused = not_boolean(value)
    if refused:
        raise ValueError(refused)
    return value


def _number(value: Any) -> Any:
    """A number field's validator (mode="before"): a number, not true or false, as OpenAI has it (pydantic took true
    for 1)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {str(value).lower()}")
    return value


def _within_cap(value: int | None) -> int | None:
    """A token count's validator: more than the worker generates (MAX_NEW_TOKENS_CAP) is refused, as vLLM refuses
    more than the model's context, not cut short."""
    cap = max_new_tokens_cap()
    if value is not None and value > cap:
        raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": cap})
    return value


def _only_with_stream(options: Any, info: ValidationInfo) -> Any:
    """`stream_options`' validator (mode="before"): options in a request that does not stream are refused, as OpenAI
    and vLLM refuse them."""
    if options and not info.data.get("stream"):
        raise ValueError("stream options can only be defined when `stream=True`")
    return options


class StreamOptions(BaseModel):
    include_usage: bool | None = False  # null as false, as vLLM takes it (it was a 400)
    # vLLM's: every chunk carries the usage so far, where it has `usage` null otherwise. It was ignored: a client of
    # vLLM's that counts tokens as they come got none.
    continuous_usage_stats: bool | None = False

    _booleans = field_validator("include_usage", "continuous_usage_stats", mode="before")(_boolean)

    @model_validator(mode="after")
    def _asks_for_usage(self) -> "StreamOptions":
        """continuous_usage_stats alone asks for usage: `include_usage` left out is then true, as vLLM's default has
        it (false, no usage is sent, continuous or not, as vLLM has it too)."""
        if self.continuous_usage_stats and "include_usage" not in self.model_fields_set:
            self.include_usage = True
        return self


class CompletionFields(BaseModel):
    """The fields a chat completion and a legacy completion share, checked alike. Other fields (OpenAI's, or vLLM's
    sampling extras) are ignored, except those that would change the answer and are not supported (`_UNSUPPORTED`:
    refused with a 400 that names them)."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    # OpenAI's (and vLLM's) range: any signed 64-bit integer; the engine's seeds are non-negative.
    seed: int | None = Field(None, ge=-2**63, lt=2**63)
    n: int | None = None
    # Nullable as in OpenAI's API: null is false (the openai package sends null for `stream=None`).
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    keep_on_disconnect: bool = Field(False, description="llava-queue: let the job finish if the client leaves")

    _stop = field_validator("stop", mode="before")(stop_of_strings)
    _booleans = field_validator("stream", "keep_on_disconnect", mode="before")(_boolean)
    _numbers = field_validator("temperature", "top_p", "seed", "n", mode="before")(_number)
    _stream_options = field_validator("stream_options", mode="before")(_only_with_stream)


class Prediction(BaseModel):
    """OpenAI's predicted output, `{"type": "content", "content": ...}`: text the answer is expected to repeat, which
    makes it come sooner where it is supported, and never changes it. Its shape is checked, as OpenAI checks it, and
    it is ignored, as vLLM ignores it."""

    type: Literal["content"]
    content: str | list[dict[str, Any]]

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_parts(cls, content: Any) -> Any:
        """One error naming `content` (pydantic's would name each member of the union)."""
        if isinstance(content, str) or isinstance(content, list) and all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in content):
            return content
        raise ValueError('must be a string or a list of text parts ({"type": "text", "text": ...})')


# OpenAI's service tiers. A request may name any: its answer says that it was served at the default one (see
# ChatCompletion.service_tier), the only one there is for an interactive request.
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]


class ChatCompletionRequest(CompletionFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)  # at most MAX_NEW_TOKENS_CAP (`_within_cap`)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Both were taken as anything at all and ignored: a misspelt tier ("prority") or a prediction in another shape
    # went without a word, where OpenAI answers 400.
    service_tier: ServiceTier | None = None
    prediction: Prediction | None = None

    _token_numbers = field_validator("max_tokens", "max_completion_tokens", mode="before")(_number)
    _caps = field_validator("max_tokens", "max_completion_tokens")(_within_cap)


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    # As OpenAI answers it: the tier that served the request when the request named one, null otherwise.
    service_tier: Literal["default"] | None = None
    choices: list[Choice]
    usage: Usage


class TextCompletionRequest(CompletionFields):
    """`POST /v1/completions`, OpenAI's legacy completions, as vLLM serves them (`vllm bench serve` and evaluation
    harnesses ask them): one prompt the client rendered, sampled as a chat completion is. Those fields of the legacy
    API that would change the answer are refused (`logprobs`, `suffix`, `echo`, `best_of`)."""

    prompt: str | list[str]  # one prompt: a list holds one string
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default (and vLLM's); null: up to MAX_NEW_TOKENS_CAP
    # Here a number (how many log probabilities per token), where a chat completion's is a boolean.
    logprobs: int | None = None
    suffix: str | None = None

    _token_numbers = field_validator("max_tokens", "logprobs", mode="before")(_number)
    _caps = field_validator("max_tokens")(_within_cap)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        """One string, or a list of one (what the openai package sends for a batch of one). Several prompts, or token
        ids, were pydantic's errors on each member of the union (`prompt.str`, `prompt.list[str].0`)."""
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(one, str) for one in prompt):
            raise ValueError(f"one prompt per request, got {len(prompt)}: send a request for each")
        raise ValueError("must be a string (token ids are not supported)")


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[TextChoice]
    usage: Usage


# OpenAI's boolean fields that are not declared above (the first is refused when true, the others are ignored): their
# type is checked all the same, as OpenAI checks it.
_BOOLEAN_EXTRAS = ("logprobs", "parallel_tool_calls", "store")

# Fields OpenAI accepts that llava-queue cannot honour: refused when set to anything but "off".
_UNSUPPORTED = {
    "tools": (lambda value: bool(value), "function calling is not supported"),
    "functions": (lambda value: bool(value), "function calling is not supported"),
    "logprobs": (lambda value: bool(value), "logprobs are not supported"),
    # 0, OpenAI's least (and vLLM's, with or without logprobs), asks for none; any other value asks for some.
    "top_logprobs": (lambda value: value is not None and (isinstance(value, bool) or value != 0),
                     "logprobs are not supported"),
    "logit_bias": (lambda value: bool(value), "logit_bias is not supported"),
    "frequency_penalty": (lambda value: bool(value), "penalties are not supported (send 0 or leave it out)"),
    "presence_penalty": (lambda value: bool(value), "penalties are not supported (send 0 or leave it out)"),
    # An object ({"type": "text"}); anything else (OpenAI refuses a string such as "json") was taken as text.
    "response_format": (lambda value: value is not None and not (isinstance(value, dict)
                                                                 and value.get("type", "text") == "text"),
                        "only the text response format is supported ({\"type\": \"text\"})"),
    "modalities": (lambda value: value not in (None, [], ["text"]), "only text output is supported"),
    "audio": (lambda value: value is not None, "audio output is not supported"),
    "web_search_options": (lambda value: value is not None, "web search is not supported"),
    # OpenAI refuses these for its models that do not reason, as none served here does ("none" asks for no
    # reasoning, "medium" is the verbosity of every answer).
    "reasoning_effort": (lambda value: value not in (None, "none"),
                         "reasoning is not supported, the model does not reason (send \"none\" or leave it out)"),
    "verbosity": (lambda value: value not in (None, "medium"),
                  "verbosity is not supported (send \"medium\" or leave it out)"),
    # vLLM's and SGLang's sampling extras (`extra_body` with the openai package): the engine samples with
    # temperature, top_p and seed only, so any other setting would be dropped without a word.
    "top_k": (lambda value: value not in (None, 0, -1), "top_k is not supported (send -1 or leave it out)"),
    "min_p": (lambda value: bool(value), "min_p is not supported (send 0 or leave it out)"),
    "repetition_penalty": (lambda value: value not in (None, 1),
                           "penalties are not supported (send 1 or leave it out)"),
    "min_tokens": (lambda value: bool(value), "min_tokens is not supported"),
    "ignore_eos": (lambda value: bool(value), "ignore_eos is not supported"),
    "stop_token_ids": (lambda value: bool(value), "stop_token_ids are not supported (use stop strings)"),
    "best_of": (lambda value: value not in (None, 1), "best_of is not supported"),
    "use_beam_search": (lambda value: bool(value), "beam search is not supported"),
    **{name: (lambda value: value is not None, "structured output is not supported")
       for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")},
    # vLLM's chat extras that change the prompt or the text returned: the worker renders the messages with the
    # model's own template and a generation prompt, and answers the generated text alone, without the stop string.
    "add_generation_prompt": (lambda value: value is False,
                              "add_generation_prompt is not supported (the generation prompt is always added)"),
    "continue_final_message": (lambda value: bool(value), "continue_final_message is not supported"),
    "chat_template": (lambda value: value is not None, "chat_template is not supported (the model's own is used)"),
    "echo": (lambda value: bool(value), "echo is not supported"),
    "include_stop_str_in_output": (lambda value: bool(value), "include_stop_str_in_output is not supported"),
    "prompt_logprobs": (lambda value: value is not None, "logprobs are not supported"),
}


def check_supported(body: ChatCompletionRequest | TextCompletionRequest) -> None:
    """Refuse (400) what would silently change the answer: n != 1, and the features in `_UNSUPPORTED`."""
    if body.n is not None and body.n != 1:
        raise ApiError(400, f"n: only n=1 is supported (one choice per request), got n={body.n}; "
                            "send n requests instead", param="n")
    for name in _BOOLEAN_EXTRAS:
        refused = not_boolean((body.model_extra or {}).get(name))
        if refused:
            raise ApiError(400, f"{name}: {refused}", param=name)
    for name, value in (body.model_extra or {}).items():
        refused = _UNSUPPORTED.get(name)
        if refused and refused[0](value):
            raise ApiError(400, f"{name}: {refused[1]}", param=name)
    check_tool_choice(body.model_extra or {})


# The values each field choosing a tool takes (OpenAI's tool_choice, and its older function_call) besides a named
# function, and the field of the tools it chooses among.
_TOOL_CHOICES = {"tool_choice": ("tools", ("none", "auto", "required")),
                 "function_call": ("functions", ("none", "auto"))}


def check_tool_choice(extra: dict[str, Any]) -> None:
    """Refuse (400, as OpenAI) a tool choice that asks for a tool call ("required", a named function) with no
    tools: ignored, it would answer text to a client that waits for a call. "none" and "auto" call no tool
    without tools (with tools, the request is refused before), so they leave the answer as it is."""
    for name, (tools, choices) in _TOOL_CHOICES.items():
        value = extra.get(name)
        if value is None or value in ("none", "auto"):
            continue
        if not isinstance(value, dict) and value not in choices:
            named = ", ".join(repr(choice) for choice in choices)
            raise ApiError(400, f"{name}: must be {named} or a named function, got {value!r}", param=name)
        if not extra.get(tools):
            raise ApiError(400, f"{name}: {name} is only allowed when {tools} are specified "
                                "(and function calling is not supported)", param=name)


def image_from_url(url: str, param: str) -> str:
    """The base64 file of a `data:<type>;base64,<data>` URL; other URLs are refused (the API fetches nothing)."""
    parts = data_url_parts(url)
    if parts is None:
        raise ApiError(400, f"{param}: only data: URLs are supported (data:image/png;base64,...); "
                            "llava-queue does not fetch remote images", param=param)
    header, data = parts
    if not header.endswith(";base64") or not data:
        raise ApiError(400, f"{param}: a data: URL must be base64-encoded (data:image/png;base64,...)", param=param)
    try:
        check_images([data])
    except ValueError as exc:
        raise ApiError(400, f"{param}: {str(exc).removeprefix('image 0 ')}", param=param) from None
    return data


def count_images(messages: list[ChatMessage]) -> None:
    """Refuse (400) more than MAX_IMAGES image parts, in one message or in all, before any is decoded: each was
    decoded first, a tenth of a second or more for a crafted file (160 images: 20 s of the API's CPU for a 400)."""
    total = 0
    for index, message in enumerate(messages):
        parts = message.content if isinstance(message.content, list) else []
        count = sum(part.get("type") == "image_url" for part in parts)
        if count > MAX_IMAGES:
            param = f"messages[{index}].content"
            raise ApiError(400, f"{param}: {count} images; the limit is {MAX_IMAGES} per request", param=param)
        total += count
    if total > MAX_IMAGES:
        raise ApiError(400, f"{total} images in the turns; the limit is {MAX_IMAGES} per request", param="messages")


def to_turn(index: int, message: ChatMessage) -> dict:
    """One OpenAI message as a llava-queue chat turn `{role, text, images}` (text parts joined by newlines)."""
    role = "system" if message.role == "developer" else message.role
    if message.content is None or isinstance(message.content, str):
        return {"role": role, "text": message.content or "", "images": []}
    texts, images = [], []
    for number, part in enumerate(message.content):
        param = f"messages[{index}].content[{number}]"
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal":
            # OpenAI's assistant content may hold the refusals the model answered: the turn says them as text.
            if role != "assistant":
                raise ApiError(400, f"{param}: refusal parts are only accepted in assistant messages", param=param)
            if not isinstance(part.get("refusal"), str):
                raise ApiError(400, f"{param}: a refusal part needs a string 'refusal'", param=param)
            texts.append(part["refusal"])
        elif kind == "image_url":
            if role != "user":
                raise ApiError(400, f"{param}: images are only accepted in user messages", param=param)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise ApiError(400, f"{param}.image_url: give {{\"url\": \"data:...\"}}", param=f"{param}.image_url")
            images.append(image_from_url(url, f"{param}.image_url.url"))
        else:
            raise ApiError(400, f"{param}: unsupported content part {kind!r} (use 'text' with a string 'text', "
                                "or 'image_url')", param=param)
    return {"role": role, "text": "\n".join(texts), "images": images}


def to_generate_request(body: ChatCompletionRequest) -> GenerateRequest:
    """The job request of a chat completion; raises ApiError (400) naming the OpenAI field. Its images, checked as
    its parts are read and again as the job request is, share one submission's decoding (`one_submission`)."""
    with one_submission():
        return _to_generate_request(body)


def _to_generate_request(body: ChatCompletionRequest) -> GenerateRequest:
    count_images(body.messages)
    return _job_request(body, {
        "messages": [to_turn(index, message) for index, message in enumerate(body.messages)],
        # Without a limit OpenAI generates until the end: here, up to the worker's cap.
        "max_new_tokens": body.max_completion_tokens or body.max_tokens or max_new_tokens_cap(),
    })


def _job_request(body: CompletionFields, fields: dict[str, Any]) -> GenerateRequest:
    """The job request of a completion: `fields` (its prompt or turns, its token limit) and the sampling fields every
    completion has; raises ApiError (400) naming the OpenAI field."""
    fields = {
        "model": body.model,
        **fields,
        "stop": body.stop,
        "seed": None if body.seed is None else body.seed % 2**63,
        # OpenAI has no top-k, and vLLM applies none unless asked: not the checkpoint's default the LLaVA payload gets.
        "top_k": 0,
    }
    if body.temperature is not None:
        fields["temperature"] = body.temperature
    if body.top_p is not None:
        fields["top_p"] = body.top_p
    try:
        request = parse_request(fields, GenerateRequest)
        check_unicode(request)  # here, to be a 400 as OpenAI's (the submission's own check is a 422)
        return request
    except (InvalidRequest, ApiError) as exc:
        param = _openai_param(exc.param)
        message = exc.message.replace(exc.param, param, 1) if exc.param else exc.message
        raise ApiError(400, message, param=param) from None


def text_generate_request(body: TextCompletionRequest) -> GenerateRequest:
    """The job request of a legacy completion: its prompt as rendered by the client; raises ApiError (400) naming
    the OpenAI field."""
    if body.logprobs is not None:
        raise ApiError(400, "logprobs: logprobs are not supported", param="logprobs")
    if body.suffix:
        raise ApiError(400, "suffix: suffix is not supported (a prompt is completed at its end only)", param="suffix")
    return _job_request(body, {"prompt": body.prompt, "max_new_tokens": body.max_tokens or max_new_tokens_cap()})


def _openai_param(param: str | None) -> str | None:
    """The OpenAI name of a field of the job request: a turn's `text` or `images` (`messages.0.text`) is the
    content of the message it came from (`messages[0].content`); other names are the same."""
    match = re.fullmatch(r"messages\.(\d+)\.(text|images)(\..*)?", param or "")
    return f"messages[{match[1]}].content" if match else param


async def require_served(registry: WorkerRegistry, model: str) -> None:
    """404 (OpenAI's answer for an unknown model) when no live worker serves `model`; 503 with Retry-After when its
    workers are away for now (one served it within RETURNING_SECONDS)."""
    served = served_models(await asyncio.to_thread(registry.workers))
    if model not in served:
        away = (await asyncio.to_thread(returning_models, registry, served)).get(model)
        if away is not None:
            raise model_away(model, away)
        raise ApiError(404, f"the model {model!r} is not served here (live workers serve: {served or 'none'})",
                       param="model", code=MODEL_NOT_FOUND)


def usage_of(record: dict) -> Usage:
    return Usage(prompt_tokens=record["prompt_tokens"], completion_tokens=record["completion_tokens"],
                 total_tokens=record["prompt_tokens"] + record["completion_tokens"])


def job_error(record: dict | None, prompt_field: str = "messages") -> ApiError | None:
    """The error a finished job answers with, or None when it succeeded with an answer; `prompt_field` is the
    request's field that a prompt filling the model's context is blamed on."""
    if record is None:
        return ApiError(500, "the job's record expired before it could be read", type="server_error",
                        code=ErrorCode.SERVER_ERROR)
    if record["status"] == "succeeded":
        if context_overflowed(record["text"], record["completion_tokens"]):
            return ApiError(400, f"{prompt_field}: the prompt fills the model's context ({record['prompt_tokens']} "
                                 "prompt tokens)", param=prompt_field, code=ErrorCode.INVALID_REQUEST)
        return None
    code = record["error_code"] or ErrorCode.SERVER_ERROR
    status, kind = _JOB_ERRORS.get(code, (500, "server_error"))
    final = code == ErrorCode.CANCELLED or record["error"] == EXHAUSTED_ERROR
    return ApiError(status, record["error"] or f"the job ended {record['status']}", type=kind, code=code,
                    headers=_NOT_RETRIED if final else None)


def completion_of(record: dict, completion_id: str, model: str, created: int,
                  service_tier: str | None = None) -> ChatCompletion:
    """The chat.completion object of a job that succeeded (its record, or a batch line's copy of it)."""
    choice = Choice(message=ChatCompletionMessage(content=record["text"]), finish_reason=record["finish_reason"])
    return ChatCompletion(id=completion_id, created=created, model=model, service_tier=service_tier, choices=[choice],
                          usage=usage_of(record))


def parse_chat_request(raw: Any) -> tuple[ChatCompletionRequest, GenerateRequest]:
    """A chat completion request body (decoded JSON) as a job request, checked as `POST /v1/chat/completions`
    checks it (a batch line runs exactly like that call); raises ApiError (400) naming the OpenAI field."""
    try:
        body = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise _invalid_request(exc.errors()) from None
    check_supported(body)
    return body, to_generate_request(body)


async def read_record(store: JobStore, job_id: str) -> dict | None:
    return await asyncio.to_thread(store.get, job_id)


class Completion:
    """One chat completion in flight: its job, and the pieces every response of it shares."""

    ID_PREFIX = COMPLETION_ID_PREFIX
    CHUNK_OBJECT = "chat.completion.chunk"
    PROMPT_FIELD = "messages"  # the request's field that a prompt too long for the model's context is blamed on

    def __init__(self, store: JobStore, hub: ChannelHub, job_id: str, model: str, keep_on_disconnect: bool,
                 service_tier: str | None = None):
        self.store, self.hub, self.job_id = store, hub, job_id
        self.id = self.ID_PREFIX + job_id
        self.model = model
        self.created = int(time.time())
        self.keep_on_disconnect = keep_on_disconnect
        self.service_tier = service_tier  # the tier that served it, when the request named one (ChatCompletion's)

    async def wait(self, request: Request) -> ChatCompletion | TextCompletion:
        """Wait for the job's end and answer the whole completion; a client that leaves cancels the job."""
        finished = asyncio.ensure_future(self._until_done())
        left = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({finished, left}, return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        if not finished.done():
            finished.cancel()
            if not self.keep_on_disconnect:
                await cancel_unless_ended(self.store, self.job_id)
            raise ApiError(499, "the client closed the request", type="client_closed_request",
                           code=ErrorCode.CANCELLED)
        if isinstance(finished.exception(), ServerStopping):
            raise self._server_stopping()
        try:
            finished.result()
            record = await read_record(self.store, self.job_id)
        except redis.RedisError as exc:
            raise self._store_unavailable(exc) from None
        error = job_error(record, self.PROMPT_FIELD)
        if error:
            raise error
        return self._answer(record)

    async def _until_done(self) -> None:
        try:
            async for event in follow_job(self.store, self.hub, self.job_id):
                if event.done:
                    return
        except JobNotFound:
            return  # read_record finds nothing and says so

    async def stream(self, include_usage: bool, keepalive: float, continuous_usage: bool = False
                     ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk shape, then `data: [DONE]`; a client that leaves cancels the job.

        Deltas are the generated text as it grows. The end is read from the job record: any text not
        yet sent, then the chunk with finish_reason, then (with include_usage) the usage chunk. An SSE comment goes
        out after `keepalive` seconds without an event (a job waiting in the queue).

        With `continuous_usage` (vLLM's continuous_usage_stats) every chunk carries the usage so far: the prompt's
        count read from the job's record once, with the first text (the role chunk waits for it, as vLLM's comes
        with the first output), the generated count from each chunk's message (no Redis read a chunk).
        """
        ended, sent = False, ""
        counts = None  # with continuous_usage, once the stream has opened: (prompt tokens, generated tokens) sent
        events = with_keepalives(follow_job(self.store, self.hub, self.job_id), keepalive)
        try:
            opening = None if continuous_usage else self._opening(include_usage)
            if opening:
                yield opening
            async for event in events:
                if event is None:
                    yield ": keepalive\n\n"
                    continue
                if event.done:
                    break
                generated = event.text[len(event.prompt):]
                # Hold back what cannot be streamed yet: the context-overflow answer (an error, see
                # job_error) and the text of a job that restarted after its worker died.
                if len(generated) > len(sent) and generated.startswith(sent) and generated != CONTEXT_OVERFLOW_MSG:
                    if continuous_usage:
                        if counts is None:
                            counts = (await self._prompt_tokens(), 0)
                            opening = self._opening(include_usage, counts)
                            if opening:
                                yield opening
                        # The event's count, its text's (a chunk's message, or the record read with the text); never
                        # lower than the last one sent.
                        counts = (counts[0], max(counts[1], event.tokens))
                    yield self._text(generated[len(sent):], include_usage, counts)
                    sent = generated
            ended = True
            record = await read_record(self.store, self.job_id)
            error = job_error(record, self.PROMPT_FIELD)
            if error is None and not record["text"].startswith(sent):
                error = ApiError(500, "the job restarted after a worker failure and its new text differs from "
                                      f"what was streamed; poll GET /v1/jobs/{self.job_id} for it",
                                 type="server_error", code=ErrorCode.SERVER_ERROR)
            if error:
                yield _sse(error_body(error.message, error.type, error.param, error.code))
            else:
                if continuous_usage:
                    if counts is None:
                        opening = self._opening(include_usage, (record["prompt_tokens"], 0))
                        if opening:
                            yield opening
                    counts = (record["prompt_tokens"], record["completion_tokens"])
                if len(record["text"]) > len(sent):
                    yield self._text(record["text"][len(sent):], include_usage, counts)
                yield self._finish(record["finish_reason"], include_usage, counts)
                if include_usage:
                    yield _sse({**self._base(), "choices": [], "usage": usage_of(record).model_dump()})
            yield "data: [DONE]\n\n"
        except JobNotFound as exc:
            ended = True
            # (A record that went while followed: Redis restarted without its data, or the key deleted; "expired"
            # named the one cause that cannot come mid-stream.)
            why = "its record left Redis while it was streamed" if isinstance(exc, JobGone) else "its record expired"
            yield _sse(error_body(f"job {self.job_id} is gone ({why})", "server_error", None, ErrorCode.NOT_FOUND))
            yield "data: [DONE]\n\n"
        except ServerStopping:
            ended = True
            error = self._server_stopping()
            yield _sse(error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        except redis.RedisError as exc:
            # Not a stream cut short (and a traceback): the job can be neither followed nor cancelled, and goes on.
            log.warning("the stream of job %s lost Redis: %s", self.job_id, exc)
            ended = True
            error = self._store_unavailable(exc)
            yield _sse(error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            # Closed now, its subscription with it: a bare `async for` leaves that to the collector.
            await events.aclose()
            if not ended and not self.keep_on_disconnect:
                await cancel_unless_ended(self.store, self.job_id)

    def _server_stopping(self) -> ApiError:
        """The API shuts down before the job ends: the job goes on, and is polled at GET /v1/jobs/{id}."""
        return ApiError(503, f"the API is restarting; job {self.job_id} goes on: poll GET /v1/jobs/{self.job_id}",
                        type="server_error", code=ErrorCode.SERVER_ERROR,
                        headers={"Retry-After": "1", JOB_ID_HEADER: self.job_id})

    def _store_unavailable(self, exc: redis.RedisError) -> ApiError:
        """Redis went away before the job ended: the job goes on at its worker, to be polled once Redis is back."""
        error = store_unavailable(exc)
        return ApiError(503, f"{error.message}; job {self.job_id} goes on: poll GET /v1/jobs/{self.job_id}",
                        type=error.type, code=error.code, headers={**error.headers, JOB_ID_HEADER: self.job_id})

    async def _prompt_tokens(self) -> int:
        """The job's prompt token count as its record holds it (written before its first text)."""
        value = await asyncio.to_thread(self.store.redis.hget, self.store.key(self.job_id), "prompt_tokens")
        return int(value) if value and value.isdigit() else 0

    def _base(self) -> dict:
        tier = {"service_tier": self.service_tier} if self.service_tier else {}
        return {"id": self.id, "object": self.CHUNK_OBJECT, "created": self.created, "model": self.model,
                "system_fingerprint": None, **tier}

    def _chunk(self, content: dict, finish_reason: str | None, include_usage: bool,
               counts: tuple[int, int] | None) -> str:
        """One chunk of the one choice: `content` is its `delta` (or a legacy completion's `text`); `counts` the
        usage so far (prompt tokens, generated tokens), with continuous usage."""
        chunk = {**self._base(), "choices": [{"index": 0, **content, "logprobs": None,
                                              "finish_reason": finish_reason}]}
        if include_usage:
            # As OpenAI: every chunk has usage null, the last one carries it; with vLLM's continuous usage, each
            # carries the counts so far.
            chunk["usage"] = None if counts is None else {"prompt_tokens": counts[0], "completion_tokens": counts[1],
                                                          "total_tokens": counts[0] + counts[1]}
        return _sse(chunk)

    def _answer(self, record: dict) -> ChatCompletion:
        return completion_of(record, self.id, self.model, self.created, self.service_tier)

    def _opening(self, include_usage: bool, counts: tuple[int, int] | None = None) -> str | None:
        """The chunk a stream starts with, before the job has generated anything: the assistant's role."""
        return self._chunk({"delta": {"role": "assistant", "content": ""}}, None, include_usage, counts)

    def _text(self, text: str, include_usage: bool, counts: tuple[int, int] | None) -> str:
        return self._chunk({"delta": {"content": text}}, None, include_usage, counts)

    def _finish(self, finish_reason: str, include_usage: bool, counts: tuple[int, int] | None) -> str:
        return self._chunk({"delta": {}}, finish_reason, include_usage, counts)


class LegacyCompletion(Completion):
    """One legacy completion (`POST /v1/completions`) in flight: a chat completion's job and stream, in the
    text_completion shape (`choices[].text`, no role chunk), as OpenAI and vLLM answer it."""

    ID_PREFIX = TEXT_COMPLETION_ID_PREFIX
    CHUNK_OBJECT = "text_completion"
    PROMPT_FIELD = "prompt"

    def _answer(self, record: dict) -> TextCompletion:
        choice = TextChoice(text=record["text"], finish_reason=record["finish_reason"])
        return TextCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                              usage=usage_of(record))

    def _opening(self, include_usage: bool, counts: tuple[int, int] | None = None) -> None:
        return None

    def _text(self, text: str, include_usage: bool, counts: tuple[int, int] | None) -> str:
        return self._chunk({"text": text}, None, include_usage, counts)

    def _finish(self, finish_reason: str, include_usage: bool, counts: tuple[int, int] | None) -> str:
        return self._chunk({"text": ""}, finish_reason, include_usage, counts)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _responses(answer: str) -> dict:
    """The OpenAPI description of a completion route's answers; `answer` is its 200's."""
    return {200: {"content": {"text/event-stream": {}}, "description": answer},
            400: {"description": "An invalid or unsupported request, in OpenAI's error shape"},
            404: {"description": "No live worker serves the model"},
            503: {"description": "The model's workers are all away for now (a restart): retry"}}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_responses(
    "A chat.completion, or with `stream` server-sent chat.completion.chunk events ending with `data: [DONE]`"))
async def create_chat_completion(body: ChatCompletionRequest, request: Request, response: Response, store: Store,
                                 hub: Hub, submitter: Submissions, registry: Registry, api_key: ApiKey,
                                 idempotency_key: IdempotencyKey = None):
    """OpenAI's chat completion, as a job: `id` is `chatcmpl-<job id>` (poll `GET /v1/jobs/<job id>`).

    With an `Idempotency-Key`, a retry of the same request follows the first one's job (its text so far, then the
    rest), a client that leaves does not cancel it (its retry may come), and `POST /v1/jobs/cancel` with the key
    cancels it.
    """
    check_supported(body)
    # On a thread: checking the images (base64 decoded, opened by PIL) takes a while, seconds for a crafted file,
    # during which the event loop would serve no other request or stream.
    job_request = await asyncio.to_thread(to_generate_request, body)
    return await _run(Completion, body, job_request, request, response, store, hub, submitter, registry, api_key,
                      idempotency_key)


@router.post("/v1/completions", response_model=TextCompletion, responses=_responses(
    "A text_completion, or with `stream` server-sent text_completion chunks ending with `data: [DONE]`"))
async def create_completion(body: TextCompletionRequest, request: Request, response: Response, store: Store,
                            hub: Hub, submitter: Submissions, registry: Registry, api_key: ApiKey,
                            idempotency_key: IdempotencyKey = None):
    """OpenAI's legacy completion of a prompt the client rendered, as a job: `id` is `cmpl-<job id>` (poll
    `GET /v1/jobs/<job id>`). Otherwise as `POST /v1/chat/completions`, `Idempotency-Key` included."""
    check_supported(body)
    job_request = await asyncio.to_thread(text_generate_request, body)
    return await _run(LegacyCompletion, body, job_request, request, response, store, hub, submitter, registry,
                      api_key, idempotency_key)


async def _run(kind: type[Completion], body: ChatCompletionRequest | TextCompletionRequest,
               job_request: GenerateRequest, request: Request, response: Response, store: JobStore,
               hub: ChannelHub, submitter: Submitter, registry: WorkerRegistry, api_key: str | None,
               idempotency_key: str | None):
    """Submit the job of a completion request (`kind` of Completion) and answer it: streamed, or whole at its end."""
    await require_served(registry, body.model)
    [job_id] = await asyncio.to_thread(submitter.submit, [(job_request, "interactive")],
                                       idempotency_key=idempotency_key, owner=api_key)
    # (Every request is served at the default tier: see ServiceTier.)
    tier = "default" if getattr(body, "service_tier", None) else None
    completion = kind(store, hub, job_id, body.model, body.keep_on_disconnect or idempotency_key is not None, tier)
    if body.stream:
        options = body.stream_options or StreamOptions()
        include_usage = bool(options.include_usage)
        keepalive = request.app.state.settings.sse_keepalive_seconds
        stream = completion.stream(include_usage, keepalive, include_usage and bool(options.continuous_usage_stats))
        return FollowingResponse(stream, job_id=job_id,
                                 send_timeout=request.app.state.settings.stream_send_timeout_seconds,
                                 media_type="text/event-stream",
                                 headers={JOB_ID_HEADER: job_id, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    response.headers[JOB_ID_HEADER] = job_id
    return await completion.wait(request)
