"""LLaVA conversation templates and prompt rendering.

Renders prompts byte-for-byte as `llava/conversation.py` of llava-torch 1.2.2.post1
does, and picks the template for a model name as its web server does. Images are
represented only by a count on the user turn: rendering never needs the pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum, auto

IMAGE_TOKEN = "<image>"


class SeparatorStyle(Enum):
    """How a template joins system prompt, roles and messages."""

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()


class TemplateError(ValueError):
    """A template name that is unknown, or a template that cannot render a conversation."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn: `text` is None for the open assistant turn the model is to fill; `images` counts its images."""

    role: str
    text: str | None
    images: int = 0
    # An empty text rendered as a turn of its own: the chat path's empty user turn. The original skips an empty
    # message (it renders `USER:` glued to the next role), which its page and scripts never send.
    empty_turn: bool = False

    @property
    def image(self) -> bool:
        """Whether the turn carries an image (a tuple message in the original)."""
        return self.images > 0


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A template plus the turns appended to it.

    `offset` counts the preset few-shot messages that belong to the template, not
    to the user. The entries of CONV_TEMPLATES are shared: take a `copy()` (or use
    `get_template`) before appending.
    """

    system: str
    roles: tuple[str, str]
    messages: list[Message]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    def copy(self) -> Conversation:
        """Return a conversation with the same settings and its own message list."""
        return dataclasses.replace(self, messages=list(self.messages))

    def append_message(self, role: str, text: str | None, images: int = 0) -> None:
        """Append a turn; `images` counts the images a user turn carries."""
        if images and text is None:
            raise ValueError("a message that carries an image needs a text (it may be empty)")
        self.messages.append(Message(role, text, int(images)))

    @property
    def stop(self) -> str | None:
        """The stop string the original web server sends with a prompt of this template."""
        if self.sep_style in (SeparatorStyle.SINGLE, SeparatorStyle.MPT):
            return self.sep
        return self.sep2

    def get_prompt(self) -> str:
        """Render the whole conversation as the model's prompt text."""
        turns = self._turns()
        style = self.sep_style
        if style is SeparatorStyle.SINGLE:
            return self._render_colon(turns, (self.sep, self.sep))
        if style is SeparatorStyle.TWO:
            return self._render_colon(turns, (self.sep, self.sep2))
        if style is SeparatorStyle.MPT:
            return self._render_mpt(turns)
        if style is SeparatorStyle.LLAMA_2:
            return self._render_llama_2(turns)
        return self._render_plain(turns)

    def _turns(self) -> list[tuple[str, str | None]]:
        """(role, text) pairs to render, text None where the original skips the message.

        The original tests a message for truth: an empty string counts as absent,
        but an image turn (a tuple there) is always present, even with empty text.
        """
        turns = [(m.role, m.text if m.image or m.text or m.empty_turn else None) for m in self.messages]
        # Only the very first message is rewritten, so for the few-shot templates
        # (offset 2) an image turn keeps its text as typed. The original's rewrite
        # (every <image> out, one in front) is for its one image: a first turn with
        # several keeps its text as typed too, where each image has its <image>.
        if self.messages and self.messages[0].images == 1:
            role = self.messages[0].role
            text = self.messages[0].text.replace(IMAGE_TOKEN, "").strip()
            if "mmtag" in self.version:
                turns[0:1] = [
                    (self.roles[0], "<Image><image></Image>"),
                    (self.roles[1], "Received."),
                    (role, text or None),
                ]
            else:
                turns[0] = (role, IMAGE_TOKEN + "\n" + text)
        return turns

    def _render_colon(self, turns, seps) -> str:
        out = self.system + seps[0]
        for i, (role, text) in enumerate(turns):
            out += f"{role}: {text}{seps[i % 2]}" if text is not None else f"{role}:"
        return out

    def _render_mpt(self, turns) -> str:
        out = self.system + self.sep
        for role, text in turns:
            out += role + text + self.sep if text is not None else role
        return out

    def _render_llama_2(self, turns) -> str:
        if not turns or turns[0][1] is None or turns[0][0] != self.roles[0]:
            raise ValueError("a LLAMA_2 prompt must start with a non-empty user message")
        out = ""
        for i, (_, text) in enumerate(turns):
            if text is None:
                continue
            if i == 0 and self.system:
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            if i % 2 == 0:
                out += f"{self.sep}[INST] {text} [/INST]"
            else:
                out += f" {text} {self.sep2}"
        # The original strips the *characters* of sep, not the prefix; kept for
        # byte equality (it only ever removes the leading "<s>").
        return out.lstrip(self.sep)

    def _render_plain(self, turns) -> str:
        seps = (self.sep, self.sep2)
        out = self.system
        for i, (_, text) in enumerate(turns):
            if text is None:
                continue
            if seps[i % 2] is None:
                # The original fails here with a TypeError (str + None).
                raise TemplateError(
                    f"template version {self.version!r} ({self.sep_style.name}) has no sep2 "
                    "and cannot render an assistant message"
                )
            out += text + seps[i % 2]
        return out


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# No space after "language." in the original.
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased "
    "and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't "
    "share false information."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_FEW_SHOT = [
    Message("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    Message(
        "Assistant",
        "Renewable energy sources are those that can be replenished naturally in a relatively "
        "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
        "Non-renewable energy sources, on the other hand, are finite and will eventually be "
        "depleted, such as coal, oil, and natural gas. Here are some key differences between "
        "renewable and non-renewable energy sources:\n"
        "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
        "energy sources are finite and will eventually run out.\n"
        "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
        "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
        "and other negative effects.\n"
        "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
        "have lower operational costs than non-renewable sources.\n"
        "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
        "locations than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
        "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
        "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
        "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
    ),
]

_HUMAN_ROLES = ("Human", "Assistant")
_USER_ROLES = ("USER", "ASSISTANT")
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
# The ChatML templates keep their system turn's header inside `system`.
_CHATML_SYSTEM = "<|im_start|>system\n"


def _two(system: str, version: str) -> Conversation:
    return Conversation(system, _USER_ROLES, [], 0, SeparatorStyle.TWO, " ", "</s>", version)


def _llama_2(system: str, sep: str) -> Conversation:
    return Conversation(system, _USER_ROLES, [], 0, SeparatorStyle.LLAMA_2, sep, "</s>", "llama_v2")


def _chatml(system: str) -> Conversation:
    return Conversation(
        _CHATML_SYSTEM + system, _CHATML_ROLES, [], 0, SeparatorStyle.MPT, "<|im_end|>", None, "mpt"
    )


_vicuna_v0 = Conversation(_HUMAN_SYSTEM, _HUMAN_ROLES, _FEW_SHOT, 2)
_vicuna_v1 = _two(_USER_SYSTEM, "v1")
_plain = Conversation("", ("", ""), [], 0, SeparatorStyle.PLAIN, "\n")
_chatml_direct = _chatml("Answer the questions.")

CONV_TEMPLATES: dict[str, Conversation] = {
    "default": _vicuna_v0,
    "v0": _vicuna_v0,
    "v1": _vicuna_v1,
    "vicuna_v1": _vicuna_v1,
    "llama_2": _llama_2(_LLAMA_2_SYSTEM, "<s>"),
    "mistral_instruct": _llama_2("", ""),
    "chatml_direct": _chatml_direct,
    "mistral_direct": _chatml_direct,
    "plain": _plain,
    "v0_plain": _plain,
    "llava_v0": Conversation(_HUMAN_SYSTEM, _HUMAN_ROLES, [], 0),
    "v0_mmtag": Conversation(_MMTAG_SYSTEM, _HUMAN_ROLES, [], 0, version="v0_mmtag"),
    "llava_v1": _two(_HUMAN_SYSTEM, "v1"),
    "v1_mmtag": _two(_MMTAG_SYSTEM, "v1_mmtag"),
    "llava_llama_2": _llama_2(_LLAVA_LLAMA_2_SYSTEM, "<s>"),
    "mpt": _chatml(
        "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
    ),
}

DEFAULT_CONVERSATION = "vicuna_v1"


def get_template(name: str) -> Conversation:
    """Return a fresh copy of the template registered as `name`; TemplateError if unknown."""
    try:
        return CONV_TEMPLATES[name].copy()
    except KeyError:
        known = ", ".join(sorted(CONV_TEMPLATES))
        raise TemplateError(f"unknown conversation template {name!r}; known templates: {known}") from None


def choose_template(model_name: str) -> str:
    """Return the template name the original web server picks for `model_name`.

    Raises TemplateError where the original picks a name it never defined
    (`mistral_orca`, `mpt_text`), where it would fail with a KeyError.
    """
    name = _web_server_template(model_name)
    if name not in CONV_TEMPLATES:
        raise TemplateError(
            f"model {model_name!r} maps to conversation template {name!r}, "
            "which LLaVA 1.2.2 names but never defines"
        )
    return name


def _web_server_template(model_name: str) -> str:
    n = model_name.lower()
    if "llava" in n:
        if "llama-2" in n:
            return "llava_llama_2"
        if "mistral" in n or "mixtral" in n:
            if "orca" in n:
                return "mistral_orca"
            if "hermes" in n:
                return "chatml_direct"
            return "mistral_instruct"
        if "llava-v1.6-34b" in n:
            return "chatml_direct"
        mmtag = "mmtag" in n or ("plain" in n and "finetune" not in n)
        if "v1" in n:
            return "v1_mmtag" if mmtag else "llava_v1"
        if "mpt" in n:
            return "mpt"
        return "v0_mmtag" if mmtag else "llava_v0"
    # The original tests these two on the name as given, not lower-cased.
    if "mpt" in model_name:
        return "mpt_text"
    if "llama-2" in model_name:
        return "llama_2"
    return "vicuna_v1"


def render_messages(template_name: str, messages: list[dict]) -> tuple[str, str | None]:
    """Render chat messages with a template; return (prompt, stop).

    `messages` are dicts {"role": "system" | "user" | "assistant", "text": str,
    "images": int}, taken in any order, as OpenAI's chat API and vLLM take them (LLaVA's
    llava-hf chat templates render any order), as long as the last turn is the user's:
    the prompt ends with the open assistant turn.
    System messages, wherever they come (joined by newlines), replace the template's system
    prompt (the text after a ChatML template's "<|im_start|>system\\n"): the templates have no
    system turn but that one. Two turns of one role in a row are joined into one (by a newline).
    A conversation that opens with the assistant's turn (a greeting) gets an empty user turn in
    front of it, since the templates go user, assistant, user (Llama 2's puts the system prompt
    in that first user turn). An empty user turn is rendered as one, with no text.
    A user turn with images and no "<image>" in its text gets "\\n<image>" appended, as the web
    server does. Raises ValueError for malformed messages, TemplateError for an unknown template.
    """
    conv = get_template(template_name)
    if not messages:
        raise ValueError("messages is empty: at least one user message is needed")
    systems = []
    role = None
    for i, message in enumerate(messages):
        kind = _role(i, message)
        if kind not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role {kind!r} is not one of system, user, assistant")
        text, images = _text_and_images(i, message)
        if kind == "system":
            if images:
                raise ValueError(f"message {i}: a system message cannot carry images")
            systems.append(text)
            continue
        role, previous = kind, role
        if role == "assistant":
            if images:
                raise ValueError(f"message {i}: an assistant message cannot carry images")
            if previous is None:
                conv.messages.append(Message(conv.roles[0], "", empty_turn=True))
        elif images and IMAGE_TOKEN not in text:
            # One per image (it was one for them all: "2 images, 1 <image>" for any turn of several, an OpenAI
            # message with two image_url parts among them).
            text += ("\n" + IMAGE_TOKEN) * images
        if role == previous:
            # Two turns of one role in a row are one turn, as OpenAI and vLLM's chat templates take them (a chat client
            # sends two user messages when the answer between them failed, or one each side of a system message): the
            # template's separators go by turns.
            last = conv.messages[-1]
            conv.messages[-1] = dataclasses.replace(last, text="\n".join(part for part in (last.text, text) if part),
                                                    images=last.images + images)
            continue
        conv.messages.append(Message(conv.roles[0 if role == "user" else 1], text, images,
                                     empty_turn=role == "user" and not text))
    if role is None:
        raise ValueError("messages hold only a system message: at least one user message is needed")
    if role != "user":
        raise ValueError(
            "the last message must come from the user: the prompt ends with the assistant's turn"
        )
    if systems:
        system = "\n".join(systems)
        if conv.system.startswith(_CHATML_SYSTEM):
            # A ChatML system prompt holds its turn's header: the message replaces the text after it.
            system = _CHATML_SYSTEM + system
        conv = dataclasses.replace(conv, system=system)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt(), conv.stop


def _role(index: int, message):
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index}: expected a dict, got {type(message).__name__}")
    return message.get("role")


def _text_and_images(index: int, message: Mapping) -> tuple[str, int]:
    text, images = message.get("text"), message.get("images", 0)
    if not isinstance(text, str):
        raise ValueError(f"message {index}: 'text' must be a string")
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise ValueError(f"message {index}: 'images' must be a non-negative integer")
    return text, images
