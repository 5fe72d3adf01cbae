"""The wire protocol: the original LLaVA request and chunk, error codes, and the one validator.

A request is the LLaVA worker payload (`model, prompt, temperature, top_p, max_new_tokens,
stop, images`) with the original defaults and clamp; llava-queue adds `messages` (rendered
by the worker with the model's template), `seed`, and the queue a job goes to.
"""

import base64
import binascii
import contextlib
import io
import json
import math
from collections.abc import Callable
from contextvars import ContextVar
from enum import IntEnum
from typing import Any, Literal

from PIL import (BmpImagePlugin, IcnsImagePlugin, IcoImagePlugin, Image, Jpeg2KImagePlugin, PngImagePlugin,
                 UnidentifiedImageError)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from shared.conversation import choose_template, render_messages

# The original worker clamps max_new_tokens to this; larger values are accepted and clamped. The default of
# LLAVA_QUEUE_MAX_NEW_TOKENS_CAP, which the API and the worker apply as they start (set_max_new_tokens_cap).
MAX_NEW_TOKENS_CAP = 1024
_max_new_tokens_cap = MAX_NEW_TOKENS_CAP


def set_max_new_tokens_cap(cap: int) -> None:
    """Clamp `max_new_tokens` to `cap` in this process (Settings.max_new_tokens_cap): requests validated from now on,
    and the largest `max_tokens` of OpenAI's route. The API clamped to 1024 whatever the setting said, so raising
    it changed nothing, and lowering it left jobs showing the value sent while they ran fewer tokens."""
    global _max_new_tokens_cap
    _max_new_tokens_cap = cap


def max_new_tokens_cap() -> int:
    """What `max_new_tokens` is clamped to in this process (`set_max_new_tokens_cap`)."""
    return _max_new_tokens_cap

# At most this many stop strings in a list (OpenAI's limit); the original sends one string.
MAX_STOP_STRINGS = 4
# A refusal names this many of a request's errors, then counts the rest: 65,536 bad images made a 3 MB message.
MAX_LISTED_ERRORS = 10
IMAGE_TOKEN = "<image>"
# Bounds on one request, far above any real LLaVA context, that keep a hostile request cheap to refuse.
MAX_PROMPT_CHARS = 400_000
MAX_IMAGES = 16
# At most this many turns in `messages`, as OpenAI's chat API takes: 200,000 empty turns (5.7 MiB) held no text, and the
# worker spent 32 s rendering and tokenizing their prompt of a million tokens.
MAX_MESSAGES = 2048
# The template text the worker may add to each turn (its role's name and separators: 28 characters for ChatML, 52
# for Llama 3's template).
TURN_CHARS = 64
# The longest prompt the worker renders from turns (refused before it is tokenized): MAX_PROMPT_CHARS of text,
# TURN_CHARS of template for each of MAX_MESSAGES turns, and the template's own (its system prompt, the v0 template's
# few-shot turns: 1,900 characters). What the API takes always fits; a template that adds more to a turn may not.
MAX_RENDERED_CHARS = MAX_PROMPT_CHARS + TURN_CHARS * MAX_MESSAGES + 16_384
# The longest `model` taken: two 255-byte path components joined by "_" (`<parent>_checkpoint-N`), the longest
# name the original derives from a model path.
MAX_MODEL_CHARS = 512
# The original samples only above this temperature (`do_sample = temperature > 0.001`); at or below it, greedy.
GREEDY_TEMPERATURE = 0.001

SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
CONTEXT_OVERFLOW_MSG = "Exceeds max token length. Please start a new conversation, thanks."
# The error of a job failed for having been started MAX_ATTEMPTS times (its workers died running it): sent again, it
# would most likely take more workers down with it.
EXHAUSTED_ERROR = "the job was started too many times: its workers died"


def context_overflowed(text: str, completion_tokens: int) -> bool:
    """Whether a job that succeeded is the original's context guard answering: its prompt left no room, so its
    whole text is CONTEXT_OVERFLOW_MSG and nothing was generated (the batch counts, OpenAI's errors and
    `llava-queue eval` take it as a failure)."""
    return completion_tokens == 0 and text == CONTEXT_OVERFLOW_MSG


def check_image_count(prompt: str, num_images: int) -> None:
    """The original LLaVA worker's rule: one image per `<image>` of the prompt; ValueError with its message (and
    the two counts) otherwise."""
    tags = prompt.count(IMAGE_TOKEN)
    if tags != num_images:
        raise ValueError(f"Number of images does not match number of <image> tokens in prompt "
                         f"({num_images} image{'s' if num_images != 1 else ''}, {tags} <image>)")


class ErrorCode(IntEnum):
    """The `error_code` of a chunk: 0-3 are the original stack's, the rest are llava-queue's."""

    OK = 0
    SERVER_ERROR = 1  # the worker failed while generating
    NO_WORKER = 2  # no worker serves the model (controller proxy)
    WORKER_FAILED = 3  # the request to the worker failed (controller proxy)
    INVALID_REQUEST = 4
    CANCELLED = 5
    EXPIRED = 6
    OVERLOADED = 7
    NOT_FOUND = 8


QueueName = Literal["interactive", "batch"]


def reads_images(model: str | None) -> bool:
    """Whether a job for `model` has its images read: the original's rule, a model whose name holds "llava"
    (any case) is multimodal and every other model ignores `images`. A job that names no model, or the empty name,
    may go to any worker (task_queue), so its images are read."""
    return not model or "llava" in model.lower()


# Whether the request being validated reads its images (`reads_images` of its model): set by GenerateRequest around
# its own validation, so that its turns, which do not know the request's model, check their images the same way.
_images_read: ContextVar[bool] = ContextVar("images_read", default=True)


# Pixels the API decodes, in all, for one submission (a request, a bulk of jobs, a batch file) to check the images that
# fail PIL's structural check (`check_images`): a crafted PNG of 190 KB whose check fails decodes 49 M pixels in half a
# second, so a 64 MiB body of them held an API core for three minutes. Past it such an image is left to the worker,
# which decodes every image anyway and fails the job, naming the image, when it cannot.
CHECK_DECODE_PIXELS = 100_000_000
# What is left of the budget of the submission being validated (`one_submission`); None outside one.
_check_decodes: ContextVar[list[int] | None] = ContextVar("check_decodes", default=None)


@contextlib.contextmanager
def one_submission():
    """The images checked inside share one CHECK_DECODE_PIXELS: an enclosing submission's, where there is one."""
    if _check_decodes.get() is not None:
        yield
        return
    token = _check_decodes.set([CHECK_DECODE_PIXELS])
    try:
        yield
    finally:
        _check_decodes.reset(token)


def stop_of_strings(stop: Any) -> Any:
    """`stop` as sent when it is a string, a list of strings or None; else one error that names `stop` (a field
    typed `str | list[str]` has pydantic name each member of the union: `stop.str: ...; stop.list[str].1: ...`)."""
    if stop is None or isinstance(stop, str) or isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise ValueError(f"must be a string or a list of up to {MAX_STOP_STRINGS} strings")


class Message(BaseModel):
    """One turn of a chat-style job; a user turn may carry images (base64 files)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)
    images: list[str] = Field(default_factory=list)

    @field_validator("images")
    @classmethod
    def _images_are_files(cls, images: list[str]) -> list[str]:
        return _check_images_if_read(images)


class GenerateRequest(BaseModel):
    """The original `/worker_generate_stream` payload, plus `messages`, `seed` and `top_k`.

    Exactly one of `prompt` (already rendered, may hold `<image>`) or `messages` is given.
    Unknown fields are ignored, as the original worker ignores them. Values the original serves are
    served: a temperature at or below 0.001 (negative too) is greedy, a top_p over 1 is 1, and images
    are read only for a model that reads them (`reads_images`; the original's text-only worker ignores them).
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, max_length=MAX_MESSAGES)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = Field(256, ge=0)
    stop: str | list[str] | None = None
    images: list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    # When sampling, keep the k most likely tokens (0: every token). None: as the original worker's `generate` does,
    # which does not pass it, so the checkpoint's generation config decides (transformers' 50 when it says nothing).
    top_k: int | None = Field(None, ge=0)
    # How the worker prepares each image before the model's own processing: the original web
    # page's modes ("Default" and "Crop" leave it as sent). None: as sent, as the original worker.
    image_process_mode: Literal["Crop", "Resize", "Pad", "Default"] | None = None

    @field_validator("model")
    @classmethod
    def _model_name(cls, model: str | None) -> str | None:
        if model is not None and len(model) > MAX_MODEL_CHARS:
            raise ValueError(f"is {len(model)} characters long; the limit is {MAX_MODEL_CHARS}")
        if model is not None and any(ord(char) < 0x20 or ord(char) == 0x7F for char in model):
            # kombu names a queue's priority lists "<queue>\x06\x16<n>": a model "M\x06\x163" reached the queue
            # of model M, and ran there under a name no worker serves.
            raise ValueError("holds a control character")
        return model

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p_as_the_original(cls, top_p: float, info: ValidationInfo) -> float:
        """Over 1 keeps the whole distribution (transformers adds no top-p step then): 1. Below 0 the original
        fails when it samples (transformers' TopPLogitsWarper raises, an error frame after its 15 s streamer
        timeout): refused at once; greedy, it never reads top_p."""
        temperature = info.data.get("temperature")
        if top_p < 0 and temperature is not None and temperature > GREEDY_TEMPERATURE:
            raise ValueError(f"must be between 0 and 1 when sampling (temperature > {GREEDY_TEMPERATURE}), "
                             f"got {top_p}")
        return min(top_p, 1.0)

    @field_validator("prompt")
    @classmethod
    def _prompt_size(cls, prompt: str | None) -> str | None:
        if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
        return prompt

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _max_new_tokens_as_the_original(cls, value: Any) -> Any:
        """The original reads it with `int()`, and a request left with fewer than one new token gets its
        "Exceeds max token length" message: a fractional number is cut to its integer part (100.5: 100), a negative
        one is 0 (that message). Both were a 422 here. A string is read as `int()` reads it ("-3" too)."""
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        if isinstance(value, float) and math.isfinite(value):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            return 0
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _clamp_max_new_tokens(cls, value: int) -> int:
        return min(value, _max_new_tokens_cap)

    @field_validator("stop", mode="before")
    @classmethod
    def _string_or_strings(cls, stop: Any) -> Any:
        return stop_of_strings(stop)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """A string is kept as sent (the original's); a list (OpenAI's form) of one string becomes that string. An
        empty string stops nothing, alone ("", as the original reads it) or in a list (it was refused there)."""
        if not isinstance(stop, list):
            return stop
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        stop = list(dict.fromkeys(string for string in stop if string))
        return None if not stop else stop[0] if len(stop) == 1 else stop

    @field_validator("images")
    @classmethod
    def _images_are_files(cls, images: list[str] | None) -> list[str] | None:
        return None if images is None else _check_images_if_read(images)

    @model_validator(mode="wrap")
    @classmethod
    def _images_read_for_the_model(cls, data, handler):
        """Validate with `_images_read` set from the request's model, for its images and its turns' images."""
        model = data.get("model") if isinstance(data, dict) else None
        token = _images_read.set(reads_images(model if isinstance(model, str) else None))
        try:
            with one_submission():
                return handler(data)
        finally:
            _images_read.reset(token)

    @model_validator(mode="before")
    @classmethod
    def _images_counted_first(cls, data: Any) -> Any:
        """The turns' images counted before any is read: each turn's were decoded, a tenth of a second or more each
        for a crafted file, before the request's total was checked (160 images: 21 s of the API's CPU for a 422)."""
        messages = data.get("messages") if isinstance(data, dict) else None
        if isinstance(messages, list):
            # Turns as JSON gives them, or as Message objects (a request built in Python).
            images = [message.get("images") if isinstance(message, dict) else getattr(message, "images", None)
                      for message in messages]
            total = sum(len(turn) for turn in images if isinstance(turn, list))
            if total > MAX_IMAGES:
                raise ValueError(f"{total} images in the turns; the limit is {MAX_IMAGES} per request")
        return data

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (a rendered prompt) or 'messages' (chat turns)")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("'messages' must hold at least one turn")
            if self.images:
                raise ValueError("with 'messages', put images in the turns, not in 'images'")
            chars = sum(len(message.text) for message in self.messages)
            if chars > MAX_PROMPT_CHARS:  # each turn's is bounded too, but the prompt they make is the request's
                raise ValueError(f"the turns hold {chars} characters of text; the limit is {MAX_PROMPT_CHARS} per "
                                 "request")
            total = len(self.all_images())  # at most MAX_IMAGES: _images_counted_first
            if self.model is not None and "llava" in self.model.lower():
                # A LLaVA worker renders the turns with the original's template for this name: what it would refuse
                # after the job was accepted (images on an assistant or system turn, a last turn not the user's) is
                # refused here, with its words.
                turns = [{"role": m.role, "text": m.text, "images": len(m.images)} for m in self.messages]
                prompt, _ = render_messages(choose_template(self.model), turns)
                # A turn whose text names more or fewer images than it carries (two `<image>` for one image, a
                # literal `<image>` in a text-only turn) was accepted, then failed at the worker.
                check_image_count(prompt, total)
        return self

    def all_images(self) -> list[str]:
        """Every image of the request in prompt order (top-level `images`, or the turns' images)."""
        if self.messages is not None:
            return [image for message in self.messages for image in message.images]
        return list(self.images or [])


class JobRequest(GenerateRequest):
    """A job submitted to `POST /v1/jobs`: a generate request, the queue it waits in, and how long it may wait.

    A job still queued `deadline_seconds` after its submission ends `expired` instead of running; one that started
    and went back to a queue (handed back, or claimed from a dead worker) may wait there as long again, from then.
    """

    queue: QueueName = "interactive"
    deadline_seconds: float | None = Field(None, gt=0, le=30 * 24 * 3600, allow_inf_nan=False)


class BulkJobRequest(BaseModel):
    """`POST /v1/jobs/bulk`: many jobs in one call."""

    jobs: list[JobRequest] = Field(min_length=1, max_length=10_000)

    @model_validator(mode="wrap")
    @classmethod
    def _one_submission(cls, data, handler):
        """The jobs' images share one submission's decoding (`one_submission`), not one each."""
        with one_submission():
            return handler(data)


def _check_images_if_read(images: list[str]) -> list[str]:
    """`check_images` for a request whose model reads images; for one whose model ignores them (the original's
    text-only worker never decodes them), only their number is bounded."""
    return check_images(images) if _images_read.get() else _check_count(images)


def check_images(images: list[str]) -> list[str]:
    """Check that every entry is an image file PIL can read, within the size limits; return the list unchanged.

    Only the file's structure is checked here (cheap, at submission); the worker decodes the pixels. A file that
    fails that check is refused only if its pixels do not decode either: the original decodes what PIL's decoder
    reads (`Image.open` then RGB), and the check is stricter (a PNG whose data chunk's checksum is wrong, or whose end
    chunk is missing, was refused with a 422 where the original answered). Such decoding takes its pixels from the
    submission's CHECK_DECODE_PIXELS; an image past it is left to the worker. So is an ICO past it: PIL decodes an
    ICO's image while it opens the file.
    """
    for index, data in enumerate(_check_count(images)):
        budget = _check_decodes.get() or [CHECK_DECODE_PIXELS]
        try:
            opened = open_image(data, index, decodes=budget)
        except _PastDecodes:
            continue
        with opened as image:
            try:
                image.verify()
                continue
            except (OSError, SyntaxError, ValueError) as exc:
                problem = exc
            pixels = image.width * image.height
        if pixels > budget[0]:
            continue
        budget[0] -= pixels
        with open_image(data, index) as image:  # verify() leaves the image unusable: opened again
            try:
                image.load()
            except Exception:  # noqa: BLE001 - whatever a decoder raises on a crafted file; the check's reason is said
                raise ValueError(f"image {index} is not a readable image file: {problem}") from None
    return images


def _check_count(images: list[str]) -> list[str]:
    """At most MAX_IMAGES images; the list unchanged."""
    if len(images) > MAX_IMAGES:
        raise ValueError(f"{len(images)} images; the limit is {MAX_IMAGES} per request")
    return images


def _allow_pixels(max_pixels: int) -> None:
    """PIL refuses an image over 2 x Image.MAX_IMAGE_PIXELS (about 179 million pixels) while opening it, before our
    check: a MAX_IMAGE_PIXELS above that was refused with a wrong message. Raise PIL's limit to ours."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def data_url_parts(text: str) -> tuple[str, str] | None:
    """The media type with its parameters (in lower case) and the data of a `data:` URL, or None for text that is
    not one. The scheme and `;base64` are read in any case, as browsers read them (RFC 2397, RFC 3986)."""
    if text[:5].lower() != "data:":
        return None
    header, _, data = text.partition(",")
    return header[5:].lower(), data


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ICO_SIGNATURE = b"\0\0\1\0"
_JPEG2000_SIGNATURES = (b"\xff\x4f\xff\x51", b"\x0d\x0a\x87\x0a", b"\x00\x00\x00\x0cjP  \x0d\x0a\x87\x0a")


def _icon_image_size(raw: bytes) -> tuple[int, int] | None:
    """The size of the image PIL decodes from an icon file (ICO, ICNS), read from that image's own header; None for
    another file, or for an icon whose image PIL cannot read that far (opening it fails the same way, undecoded).

    An icon holds its images as files of their own (PNG, BMP, JPEG 2000), which PIL decodes at their own size, not
    at the size the icon's directory gives: a 657 KB ICO of "16x16" held a 13000x13000 PNG, which PIL decodes while
    it opens the ICO (676 MB, 2 s, for each request that sent it), before the pixel limit could be checked; an ICNS
    passed the API's check and was decoded by the worker, outside its pixel budget."""
    buffer = io.BytesIO(raw)
    try:
        if raw.startswith(_ICO_SIGNATURE):
            # PIL reads the first entry of its sorted directory.
            buffer.seek(IcoImagePlugin.IcoFile(buffer).entry[0].offset)
            png = buffer.read(8) == _PNG_SIGNATURE
            buffer.seek(-8, io.SEEK_CUR)
            width, height = (PngImagePlugin.PngImageFile if png else BmpImagePlugin.DibImageFile)(buffer).size
            return (width, height) if png else (width, height // 2)  # a BMP frame's height counts its mask too
        if raw[:4] == b"icns":
            icns = IcnsImagePlugin.IcnsFile(buffer)
            sizes = []
            # PIL reads every image of the largest size the directory names; those not PNG nor JPEG 2000 are of that
            # size.
            for code, _ in icns.SIZES[icns.bestsize()]:
                start, length = icns.dct.get(code, (0, 0))
                frame = raw[start:start + length]
                if frame.startswith(_PNG_SIGNATURE):
                    sizes.append(PngImagePlugin.PngImageFile(io.BytesIO(frame)).size)
                elif frame[:12].startswith(_JPEG2000_SIGNATURES):
                    sizes.append(Jpeg2KImagePlugin.Jpeg2KImageFile(io.BytesIO(frame)).size)
            return max(sizes, key=lambda size: size[0] * size[1], default=None)
    except Exception:  # noqa: BLE001 - PIL reads the same headers first, and fails as these parsers do
        return None
    return None


# The formats PIL decodes by itself, which the worker reads: a file of another format PIL identifies passed the
# API's check (its header opens) and failed its job. EPS needs Ghostscript, WMF a handler PIL has only on Windows,
# BUFR, GRIB and HDF5 a handler an application registers; MPEG has no decoder; IPTC opens the file it wraps, in any
# format, EPS too. MPO is a JPEG of several frames.
_READ_FORMATS = frozenset({
    "AVIF", "BLP", "BMP", "CUR", "DCX", "DDS", "DIB", "FITS", "FLI", "FTEX", "GBR", "GIF", "ICNS", "ICO", "IM", "IMT",
    "JPEG", "JPEG2000", "MCIDAS", "MPO", "MSP", "PCD", "PCX", "PIXAR", "PNG", "PPM", "PSD", "QOI", "SGI", "SPIDER",
    "SUN", "TGA", "TIFF", "WEBP", "XBM", "XPM", "XVThumb"})


class _PastDecodes(Exception):
    """An ICO whose image is past the budget of decoding `open_image` was given: PIL decodes it to open the file."""


def open_image(data: str, index: int = 0, *, max_bytes: int | None = None,
               max_pixels: int | None = None, decodes: list[int] | None = None,
               before_decode: Callable[[tuple[int, int]], object] | None = None) -> Image.Image:
    """Open one image of a request: base64 of an image file, plain or as a `data:` URL.

    The one place both the API and the worker read images, with the byte limit (on the base64
    text) and the pixel limit (read from the file's header, before any pixel is decoded: a
    decompression bomb is refused here) of the settings unless given. Returns the opened, not yet
    decoded, image; raises ValueError with a message that names the image by its index. An ICO's
    image is decoded as it is opened: given `decodes` (what is left of a budget of pixels, `check_images`),
    its pixels are taken from it, and one past it raises _PastDecodes, undecoded. `before_decode` is called with the
    size of an icon's image before it is opened: the worker holds its budget for that image's pixels first.
    """
    if max_bytes is None or max_pixels is None:
        from shared.settings import get_settings

        settings = get_settings()
        max_bytes = settings.max_image_bytes if max_bytes is None else max_bytes
        max_pixels = settings.max_image_pixels if max_pixels is None else max_pixels
    if not isinstance(data, str) or not data:
        raise ValueError(f"image {index} is empty")
    parts = data_url_parts(data)
    if parts is not None:
        header, data = parts
        if not header.endswith(";base64"):
            raise ValueError(f"image {index} is a data: URL that is not base64 (send data:image/png;base64,...)")
    if len(data) > max_bytes:
        raise ValueError(f"image {index} is {len(data)} bytes of base64; the limit is {max_bytes}")
    try:
        # As the original (`b64decode(s)`): characters outside the base64 alphabet (line breaks, spaces) are
        # skipped; a file that is then not an image is refused below.
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError):
        raise ValueError(f"image {index} is not valid base64 (send the image file's bytes base64-encoded, "
                         "or a data:image/...;base64, URL)") from None
    _allow_pixels(max_pixels)
    inner = _icon_image_size(raw)
    if inner is not None and inner[0] * inner[1] > max_pixels:
        raise ValueError(f"image {index} is too large: an icon holding a {inner[0]}x{inner[1]} image = "
                         f"{inner[0] * inner[1]} pixels; the limit is {max_pixels}")
    if inner is not None and decodes is not None and raw.startswith(_ICO_SIGNATURE):
        if inner[0] * inner[1] > decodes[0]:
            raise _PastDecodes
        decodes[0] -= inner[0] * inner[1]
    if inner is not None and before_decode is not None:
        before_decode(inner)
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise ValueError(f"image {index} is too large: over {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ValueError(f"image {index} is not an image file (no image format recognised in its "
                         f"{len(raw)} bytes)") from None
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise what they like on crafted files
        # (OSError, SyntaxError, ValueError, and NotImplementedError for a DDS of an unknown pixel format): every
        # one is a file that cannot be read, a 422 for the API and a failed job for the worker, never a 500.
        raise ValueError(f"image {index} is not a readable image file: {type(exc).__name__}: {exc}") from None
    if image.format not in _READ_FORMATS:
        image.close()
        raise ValueError(f"image {index} is not a readable image file: its format, {image.format}, is not read "
                         "(send PNG, JPEG, WEBP or GIF)")
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ValueError(f"image {index} is too large: {width}x{height} = {width * height} pixels; "
                         f"the limit is {max_pixels}")
    if width < 1 or height < 1:
        image.close()
        raise ValueError(f"image {index} is empty ({width}x{height} pixels)")
    return image


class InvalidRequest(ValueError):
    """A request that failed validation; `message` names the field, `param` is its path; `status` is the HTTP
    status it answers with (400 for malformed JSON, 422 for a bad field)."""

    def __init__(self, message: str, param: str | None = None, status: int = 422):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def describe_validation_error(exc: ValidationError | list[dict]) -> InvalidRequest:
    """Turn pydantic's errors into one readable message that names the first bad fields (MAX_LISTED_ERRORS) and
    counts the rest."""
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc
    parts, first_param = [], None
    for error in errors:
        if error.get("type") == "json_invalid":
            return InvalidRequest(f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}", None, 400)
        if len(parts) == MAX_LISTED_ERRORS:
            continue
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
        field = ".".join(loc)
        message = error.get("msg", "invalid").removeprefix("Value error, ")
        if error.get("type") == "missing":
            message = "field required"
        elif not field and error.get("type") in ("model_attributes_type", "model_type", "dict_type"):
            message = "the body must be a JSON object"
        parts.append(f"{field}: {message}" if field else message)
        first_param = first_param or field or None
    message = "; ".join(parts) or "invalid request"
    if len(errors) > len(parts) and parts:
        more = len(errors) - len(parts)
        message += f"; and {more:,} more error{'s' if more > 1 else ''}"
    return InvalidRequest(message, first_param)


def parse_request(raw: bytes | str | dict, model: type[BaseModel] = GenerateRequest) -> BaseModel:
    """Validate a raw body (JSON text or a decoded dict) into `model`; raises InvalidRequest."""
    try:
        if isinstance(raw, dict):
            return model.model_validate(raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise describe_validation_error(exc) from None


def encode_chunk(text: str, error_code: int = 0) -> bytes:
    """One frame of the original stream: `json.dumps` with Python defaults, then a NUL byte."""
    return json.dumps({"text": text, "error_code": int(error_code)}).encode() + b"\0"
