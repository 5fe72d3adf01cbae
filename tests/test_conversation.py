"""Conversation templates against prompts rendered by the original LLaVA 1.2.2.post1 code."""

import json
from pathlib import Path

import pytest

from shared.conversation import (
    CONV_TEMPLATES,
    DEFAULT_CONVERSATION,
    SeparatorStyle,
    TemplateError,
    choose_template,
    get_template,
    render_messages,
)

GOLDEN = json.loads(
    (Path(__file__).resolve().parent / "fixtures" / "conversation_golden.json").read_text()
)
PROMPTS = GOLDEN["prompts"]
CHOICES = GOLDEN["template_choice"]


def _id(entry):
    return f"{entry['template']}-{entry['case']}"


def test_registry_holds_exactly_the_original_templates():
    assert sorted(CONV_TEMPLATES) == sorted({entry["template"] for entry in PROMPTS})
    assert len(PROMPTS) == 64


def test_default_conversation():
    assert DEFAULT_CONVERSATION in GOLDEN["default_conversation"]
    for name in GOLDEN["default_conversation"]:
        assert CONV_TEMPLATES[name] == CONV_TEMPLATES[DEFAULT_CONVERSATION]


@pytest.mark.parametrize("entry", PROMPTS, ids=_id)
def test_conversation_renders_golden_prompt(entry):
    conv = get_template(entry["template"])
    assert conv.sep_style is SeparatorStyle[entry["sep_style"]]
    assert conv.version == entry["version"]
    assert conv.stop == entry["stop"]
    preset = [(m.role, m.text, m.image) for m in conv.messages]
    golden = [(m["role"], m["text"], m["image"]) for m in entry["messages"]]
    assert len(preset) == conv.offset
    assert golden[: conv.offset] == preset
    for role, text, image in golden[conv.offset :]:
        conv.append_message(role, text, int(image))
    if entry["prompt"] is None:
        with pytest.raises(TemplateError):
            conv.get_prompt()
    else:
        assert conv.get_prompt() == entry["prompt"]


@pytest.mark.parametrize("entry", PROMPTS, ids=_id)
def test_render_messages_matches_golden_prompt(entry):
    offset = CONV_TEMPLATES[entry["template"]].offset
    turns = entry["messages"][offset:]
    assert turns[-1]["text"] is None
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "text": m["text"], "images": int(m["image"])}
        for i, m in enumerate(turns[:-1])
    ]
    if entry["prompt"] is None:
        with pytest.raises(TemplateError):
            render_messages(entry["template"], messages)
    else:
        assert render_messages(entry["template"], messages) == (entry["prompt"], entry["stop"])


def test_get_template_returns_an_independent_copy():
    conv = get_template("llava_v1")
    conv.append_message("USER", "Hi")
    assert CONV_TEMPLATES["llava_v1"].messages == []


@pytest.mark.parametrize("entry", CHOICES, ids=lambda e: e["model_name"])
def test_choose_template_golden(entry):
    if entry["template_exists"]:
        assert choose_template(entry["model_name"]) == entry["template"]
    else:
        with pytest.raises(TemplateError) as error:
            choose_template(entry["model_name"])
        assert entry["model_name"] in str(error.value)
        assert entry["template"] in str(error.value)
        with pytest.raises(TemplateError, match="known templates: "):
            get_template(entry["template"])


@pytest.mark.parametrize(
    "model_name, template",
    [
        ("LLaVA-7B-v0", "llava_v0"),
        ("llava-v0-plain-pretrain", "v0_mmtag"),
        ("llava-v1-plain-finetune", "llava_v1"),
        ("llava-v1.6-mixtral-8x7b", "mistral_instruct"),
        ("LLaVA-Llama-2-7B", "llava_llama_2"),
        # Outside llava names the original is case-sensitive.
        ("Llama-2-7b-chat", "vicuna_v1"),
        ("MPT-7B-chat", "vicuna_v1"),
        ("", "vicuna_v1"),
    ],
)
def test_choose_template_fallbacks(model_name, template):
    assert choose_template(model_name) == template


def test_choose_template_undefined_mistral_orca():
    with pytest.raises(TemplateError, match="mistral_orca"):
        choose_template("llava-v1.6-mistral-orca-7b")


def test_system_message_replaces_template_system():
    prompt, stop = render_messages(
        "llava_v1", [{"role": "system", "text": "Be brief.", "images": 0}, {"role": "user", "text": "Hi", "images": 0}]
    )
    assert (prompt, stop) == ("Be brief. USER: Hi ASSISTANT:", "</s>")


def test_system_message_in_llama_2_and_empty_system():
    prompt, _ = render_messages(
        "llava_llama_2", [{"role": "system", "text": "Sys", "images": 0}, {"role": "user", "text": "Hi", "images": 0}]
    )
    assert prompt == "[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST]"
    prompt, _ = render_messages(
        "llava_llama_2", [{"role": "system", "text": "", "images": 0}, {"role": "user", "text": "Hi", "images": 0}]
    )
    assert prompt == "[INST] Hi [/INST]"


def test_image_without_placeholder_is_moved_to_the_front():
    prompt, _ = render_messages("llava_v1", [{"role": "user", "text": "  What is this?  ", "images": 1}])
    assert prompt.endswith(" USER: <image>\nWhat is this? ASSISTANT:")


def test_image_with_empty_text():
    prompt, _ = render_messages("chatml_direct", [{"role": "user", "text": "", "images": 1}])
    assert prompt == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\n<|im_end|><|im_start|>assistant\n"
    )


def test_image_after_few_shot_keeps_web_server_text():
    # In default/v0 the first message is the few-shot one, so the image turn is not rewritten.
    prompt, _ = render_messages("default", [{"role": "user", "text": "What is this?", "images": 1}])
    assert prompt.endswith("###Human: What is this?\n<image>###Assistant:")


def test_mmtag_image_exchange():
    prompt, _ = render_messages("v1_mmtag", [{"role": "user", "text": "What is this?", "images": 1}])
    assert prompt.endswith(" USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is this? ASSISTANT:")


def test_a_first_turn_with_several_images_keeps_its_text_as_typed():
    # The original's rewrite of the first turn (every <image> out, one in front) is for its one image: applied to a
    # turn with two images and two <image>s, it left one <image> for two images, and the job always failed.
    text = "Left: <image> Right: <image> Which is brighter?"
    prompt, _ = render_messages("llava_v1", [{"role": "user", "text": text, "images": 2}])
    assert prompt.endswith(f" USER: {text} ASSISTANT:") and prompt.count("<image>") == 2
    prompt, _ = render_messages("v1_mmtag", [{"role": "user", "text": text, "images": 2}])
    assert prompt.endswith(f" USER: {text} ASSISTANT:") and prompt.count("<image>") == 2


def test_a_turn_of_several_images_without_image_tokens_gets_one_for_each():
    # One "\n<image>" was appended for them all, so such a turn (an OpenAI message with two image_url parts) always
    # failed with "2 images, 1 <image>".
    prompt, _ = render_messages("llava_v1", [{"role": "user", "text": "Which is brighter?", "images": 2}])
    assert prompt.endswith(" USER: Which is brighter?\n<image>\n<image> ASSISTANT:"), prompt
    messages = [{"role": "user", "text": "Hello", "images": 0}, {"role": "assistant", "text": "Hi.", "images": 0},
                {"role": "user", "text": "And these?", "images": 3}]
    prompt, _ = render_messages("llava_v1", messages)
    assert prompt.endswith("</s>USER: And these?\n<image>\n<image>\n<image> ASSISTANT:"), prompt


def test_later_image_turn_keeps_its_text():
    messages = [
        {"role": "user", "text": "Hello", "images": 0},
        {"role": "assistant", "text": "Hi.", "images": 0},
        {"role": "user", "text": "And this?", "images": 1},
    ]
    prompt, _ = render_messages("llava_v0", messages)
    assert prompt.endswith("###Human: Hello###Assistant: Hi.###Human: And this?\n<image>###Assistant:")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "system", "text": "S", "images": 0}], "only a system message"),
        ([{"role": "bot", "text": "Hi", "images": 0}], "role 'bot'"),
        ([{"role": "assistant", "text": "Hi", "images": 0}], "last message"),
        ([{"role": "user", "text": "a", "images": 0}, {"role": "assistant", "text": "b", "images": 0}], "last message"),
        ([{"role": "user", "text": None, "images": 0}], "'text' must be a string"),
        ([{"role": "user", "text": "a", "images": -1}], "non-negative"),
        ([{"role": "user", "text": "a", "images": 0}, {"role": "assistant", "text": "b", "images": 1}],
         "cannot carry images"),
        (["hello"], "expected a dict"),
    ],
)
def test_render_messages_rejects_bad_input(messages, match):
    with pytest.raises(ValueError, match=match):
        render_messages("llava_v1", messages)


def test_unknown_template_lists_known_names():
    with pytest.raises(TemplateError, match="llava_v1"):
        render_messages("nope", [{"role": "user", "text": "Hi", "images": 0}])


@pytest.mark.parametrize("template", ["chatml_direct", "mistral_direct", "mpt"])
def test_system_message_in_chatml_templates_keeps_the_system_header(template):
    # The ChatML templates' system prompt carries its own "<|im_start|>system\n" header: a system message
    # replaces the text after it, not the header (else the prompt starts with a bare "Be brief.<|im_end|>").
    prompt, stop = render_messages(
        template, [{"role": "system", "text": "Be brief.", "images": 0}, {"role": "user", "text": "Hi", "images": 0}]
    )
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    assert stop == "<|im_end|>"
