"""Offline evaluation as the original `llava/eval/model_vqa.py` does it (and its variants: `model_vqa_loader.py`'s
defaults, `model_vqa_science.py`'s question file, `model_vqa_mmbench.py`'s questions and answer lines).

A question line `{"question_id", "image", "text"[, "category"]}` becomes the prompt
`"<image>\\n" + text` in the chosen conversation template (the worker wraps `<image>` in
`<im_start>`/`<im_end>` for models configured so, as the original does); generation runs with
no stop string, to EOS or the token limit, and the answer is the decoded text, stripped. The
answers file holds one line per question, keys in the original's order, written with
`json.dumps`' default formatting. Both `POST /v1/batches` and `llava-queue eval` use these
functions, so the two give the same prompts and the same answer lines.
"""

import base64
import json
import math
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.conversation import IMAGE_TOKEN, get_template
from shared.protocol import MAX_NEW_TOKENS_CAP, MAX_PROMPT_CHARS, JobRequest

DEFAULT_CONV_MODE = "llava_v1"
SCIENCE_CONV_MODE = "llava_v0"  # `model_vqa_science.py`'s default (the ScienceQA script passes vicuna_v1)
# What `model_vqa_science.py --single-pred-prompt` appends to each question, on a line of its own.
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
# `model_vqa_mmbench.py --single-pred-prompt --lang cn`'s (MMBench-CN), in place of SINGLE_PRED_PROMPT.
SINGLE_PRED_PROMPT_CN = "请直接回答选项字母。"
# The option columns `model_vqa_mmbench.py` reads, in order: those after the first absent one are not.
MMBENCH_OPTIONS = ("A", "B", "C", "D")
DEFAULT_TEMPERATURE = 0.2
# `model_vqa.py` hard-codes max_new_tokens=1024; `model_vqa_loader.py`, which the official benchmark scripts run
# (VQAv2, GQA, TextVQA, POPE, MME...), defaults to 128.
DEFAULT_MAX_NEW_TOKENS = MAX_NEW_TOKENS_CAP
LOADER_MAX_NEW_TOKENS = 128
# shortuuid's alphabet (no 0, 1, I, O, l) and length, as the original's `answer_id`.
_SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_SHORTUUID_LENGTH = 22


class Question(BaseModel):
    """One line of an original question file. Other keys are ignored, as the original ignores them.

    `question_id` is any JSON value and is echoed as given. A line without `image` is a
    text-only question (the original would fail on it).
    """

    model_config = ConfigDict(extra="ignore")

    question_id: Any = Field(...)
    text: str = Field(max_length=MAX_PROMPT_CHARS)
    image: str | None = None
    category: Any = None  # never read, as in the original: any value

    @field_validator("question_id")
    @classmethod
    def _present(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null")
        if isinstance(value, (dict, list)):
            raise ValueError("must be a string or a number")
        if isinstance(value, float) and not math.isfinite(value):
            # Python's json reads NaN and Infinity, which are no JSON: echoed, they made the answers line invalid.
            raise ValueError(f"must be a JSON number, not {value}")
        return value

    @property
    def echoed(self) -> str:
        """The answers line's `prompt`: the question text as given."""
        return self.text

    @property
    def matched(self) -> str:
        """What its answer line is matched by, beside question_id (`answer_matched` of the line)."""
        return self.echoed

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def answer_record(self, text: str, model_id: str) -> dict[str, Any]:
        """Its answers-file object."""
        return answer_record(self.question_id, self.echoed, text, model_id)


class ScienceQuestion(Question):
    """A question of `model_vqa_science.py`'s file (`science_question`), whose answers line's `prompt` starts with
    `<image>\\n` when it has an image, as that script writes it."""

    @property
    def echoed(self) -> str:
        return f"{IMAGE_TOKEN}\n{self.text}" if self.image is not None else self.text


class MMBenchQuestion(Question):
    """A question of `model_vqa_mmbench.py` (`mmbench_questions`): one round of a row of its TSV, its image in the row
    (base64) rather than in a file. Its answer line echoes `shown` (the question without the instruction that
    --single-pred-prompt adds to `text`) and says which round it is, with the options in that round's order."""

    shown: str
    round_id: int
    options: list[str]
    option_char: list[str]
    image_b64: str

    @property
    def echoed(self) -> str:
        return self.shown

    @property
    def matched(self) -> str:
        # Two rounds of options alike are two questions of one text.
        return json.dumps([self.round_id, self.shown])

    @property
    def has_image(self) -> bool:
        return True

    def answer_record(self, text: str, model_id: str) -> dict[str, Any]:
        """The answers-file object `model_vqa_mmbench.py` writes, keys in its order."""
        return {"question_id": self.question_id, "round_id": self.round_id, "prompt": self.shown,
                "text": answer_text(text), "options": self.options, "option_char": self.option_char,
                "answer_id": new_answer_id(), "model_id": model_id, "metadata": {}}


class EvalParams(BaseModel):
    """The batch-level parameters of `model_vqa.py`, with its defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    conv_mode: str = DEFAULT_CONV_MODE
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    num_beams: int = 1
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)

    @field_validator("conv_mode")
    @classmethod
    def _known_template(cls, name: str) -> str:
        get_template(name)  # TemplateError (a ValueError) names the known templates
        return name

    @field_validator("num_beams")
    @classmethod
    def _greedy_or_sampling_only(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"num_beams={value} is not supported: llava-queue decodes one beam "
                             "(greedy when temperature is 0, sampling otherwise); use num_beams=1")
        return value


def question_prompt(text: str, conv_mode: str, with_image: bool = True) -> str:
    """The prompt `model_vqa.py` builds for a question: `<image>\\n` + text as the user turn, then the open answer."""
    conv = get_template(conv_mode)
    conv.append_message(conv.roles[0], f"{IMAGE_TOKEN}\n{text}" if with_image else text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def question_job(question: Question, params: EvalParams, image_b64: str | None) -> JobRequest:
    """The batch-queue job for one question; `image_b64` is the question's image file, base64."""
    if (image_b64 is None) == question.has_image:
        raise ValueError("an image is given exactly when the question names one")
    return JobRequest(
        model=params.model,
        prompt=question_prompt(question.text, params.conv_mode, with_image=image_b64 is not None),
        images=[image_b64] if image_b64 is not None else None,
        temperature=params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        max_new_tokens=params.max_new_tokens,
        seed=params.seed,
        queue="batch",
    )


def read_image_b64(folder: Path, name: str) -> str:
    """The image file `name` under `folder`, base64 (no path checks: see the callers)."""
    return base64.b64encode((folder / name).read_bytes()).decode("ascii")


def answer_text(generated: str) -> str:
    """The answer as the original writes it: the decoded new text, stripped."""
    return generated.strip()


def new_answer_id() -> str:
    """An id shaped like `shortuuid.uuid()`: 22 characters of its 57-letter alphabet."""
    return "".join(secrets.choice(_SHORTUUID_ALPHABET) for _ in range(_SHORTUUID_LENGTH))


def answer_record(question_id: Any, prompt: str, text: str, model_id: str,
                  answer_id: str | None = None) -> dict[str, Any]:
    """One answers-file object, keys in the original's order; `prompt` is the question text as given."""
    return {"question_id": question_id, "prompt": prompt, "text": answer_text(text),
            "answer_id": answer_id or new_answer_id(), "model_id": model_id, "metadata": {}}


def answer_matched(record: dict[str, Any]) -> str | None:
    """What an answer line is matched to its question by, beside question_id (`Question.matched`): its prompt (None
    when it is no string), and its round_id where it has one (`model_vqa_mmbench.py`'s)."""
    prompt = record.get("prompt")
    prompt = prompt if isinstance(prompt, str) else None
    return json.dumps([record["round_id"], prompt]) if "round_id" in record else prompt


def answer_line(record: dict[str, Any]) -> str:
    """An answers-file line: `json.dumps` with its default formatting, as the original writes it."""
    return json.dumps(record) + "\n"


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """Chunk `chunk_idx` of `num_chunks` contiguous chunks of ceil(n / num_chunks) items, as the original splits.

    The original fails with an IndexError for a chunk that does not exist; this says why.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, not {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be in 0..{num_chunks - 1}, not {chunk_idx}")
    size = math.ceil(len(items) / num_chunks)
    chunks = [list(items[i:i + size]) for i in range(0, len(items), size)] if size else []
    if chunk_idx >= len(chunks):
        raise ValueError(f"{len(items)} questions in chunks of {size} make {len(chunks)} chunks; "
                         f"chunk {chunk_idx} does not exist")
    return chunks[chunk_idx]


def loader_conv_mode(conv_mode: str, model_name: str) -> str:
    """The conversation template `model_vqa_loader.py` uses: a "plain" (projector-pretrained) model's gets `_mmtag`
    appended, unless the model is a finetune or the template has mmtag already."""
    if "plain" in model_name and "finetune" not in model_name.lower() and "mmtag" not in conv_mode:
        return f"{conv_mode}_mmtag"
    return conv_mode


def model_name_from_path(model_path: str) -> str:
    """The model name the original derives from a model path (`get_model_name_from_path`).

    The last path part; a `checkpoint-N` folder is joined with its parent by "_".
    """
    parts = model_path.rstrip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def stated_question_id(line: Any, key: str = "question_id") -> str | int | float | None:
    """The `question_id` a line (decoded JSON) states (under `key`), for its errors record even when the line is no
    valid question (one without `text`, say): a string or a finite number, else None (an errors file holds no list,
    and JSON no Infinity)."""
    question_id = line.get(key) if isinstance(line, dict) else None
    finite = not isinstance(question_id, float) or math.isfinite(question_id)
    return question_id if isinstance(question_id, str | int | float) and finite else None


def parse_question_line(line: str | bytes) -> Question:
    """A question from one JSONL line; ValueError (pydantic's ValidationError) says what is wrong."""
    return Question.model_validate_json(line)


def science_question(entry: Any, single_pred_prompt: bool = False) -> ScienceQuestion:
    """A question of `model_vqa_science.py`'s file, an entry of its JSON list (ScienceQA's `llava_test_CVPR.json`):
    its `id`, the first turn of its `conversations` with `<image>` taken out, stripped (and then SINGLE_PRED_PROMPT on
    a line of its own, with `single_pred_prompt`), and its `image` if it names one. ValueError (pydantic's
    ValidationError among them) says what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError("the entry is no JSON object")
    if "id" not in entry:
        raise ValueError("id: field required")
    try:
        value = entry["conversations"][0]["value"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("conversations[0].value (the question): field required") from None
    if not isinstance(value, str):
        raise ValueError("conversations[0].value: must be a string")
    text = value.replace(IMAGE_TOKEN, "").strip()
    if single_pred_prompt:
        text = f"{text}\n{SINGLE_PRED_PROMPT}"
    return ScienceQuestion(question_id=entry["id"], text=text, image=entry.get("image"))


def is_none(value: str | None) -> bool:
    """Whether a field of `model_vqa_mmbench.py`'s TSV is absent, as it reads the file (pandas' `read_table`): empty,
    one of pandas' default missing-value strings, or `nan`/`none` in any case (the script's own `is_none`)."""
    return value is None or value in PANDAS_NA or value.lower() in ("nan", "none")


# What pandas reads as a missing value by default (`keep_default_na`).
PANDAS_NA = frozenset(("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"))


def mmbench_questions(row: dict[str, Any], question_id: Any, all_rounds: bool = False,
                      instruction: str | None = None) -> list[MMBenchQuestion]:
    """The questions `model_vqa_mmbench.py` asks of a row of its TSV (column name to field; a field the row lacks is
    left out), whose `index` is `question_id`: the hint (if any) on a line before the question, then a line "A. ..."
    per option, options read from A to D up to the first absent one; `instruction` (SINGLE_PRED_PROMPT or
    SINGLE_PRED_PROMPT_CN) on a line after. One question, round 0; with `all_rounds` one per option, each round with
    the options turned one further (the letters stay: round 1 of A/B/C shows B's option as A), none for a row without
    options. ValueError (pydantic's ValidationError among them) says what is wrong."""
    question, hint, image = row.get("question"), row.get("hint"), row.get("image")
    if is_none(question):
        raise ValueError("question: field required")
    if is_none(image):
        raise ValueError("image: field required (model_vqa_mmbench.py reads it from the question file, base64)")
    options: list[str] = []
    for char in MMBENCH_OPTIONS:
        if is_none(row.get(char)):
            break
        options.append(row[char])
    chars = list(MMBENCH_OPTIONS[:len(options)])
    questions = []
    for round_id in range(len(options) if all_rounds else 1):
        shown = question if is_none(hint) else f"{hint}\n{question}"
        shown += "".join(f"\n{char}. {option}" for char, option in zip(MMBENCH_OPTIONS, options))
        questions.append(MMBenchQuestion(
            question_id=question_id, text=shown if instruction is None else f"{shown}\n{instruction}", shown=shown,
            round_id=round_id, options=options, option_char=chars, image_b64=image))
        options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
    return questions
