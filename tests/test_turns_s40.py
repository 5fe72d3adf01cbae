"""Two chat turns of one role in a row were refused for a LLaVA model ("message 1: expected a 'assistant' message
(user and assistant alternate)", a 422 at submission, a 400 on /v1/chat/completions), where OpenAI and vLLM's
llava-hf chat template take them: a chat client sends two user messages when the answer between them failed or was
stopped, and some send several system messages. They are joined into one turn now, by a newline, so the template's
separators, which go turn by turn, stay right."""

import pytest
import requests

from conftest import run_stack
from llava_fixtures import png_b64
from shared.conversation import render_messages
from shared.redis_server import RedisServer


def turn(role: str, text: str, images: int = 0) -> dict:
    return {"role": role, "text": text, "images": images}


@pytest.mark.parametrize("template", ["llava_v1", "llava_v0", "llava_llama_2", "mpt", "chatml_direct", "plain"])
def test_two_user_turns_in_a_row_render_as_one(template):
    joined, _ = render_messages(template, [turn("user", "Hello.\nWhat is this?")])
    assert render_messages(template, [turn("user", "Hello."), turn("user", "What is this?")])[0] == joined
    if template == "plain":
        return  # (it renders no assistant turn: the original's fails on one)
    # Between two answers as well.
    one = [turn("user", "a"), turn("assistant", "b"), turn("user", "c\nd")]
    two = [turn("user", "a"), turn("assistant", "b"), turn("user", "c"), turn("user", "d")]
    assert render_messages(template, two)[0] == render_messages(template, one)[0]


def test_assistant_and_system_turns_in_a_row_are_joined_too():
    one = [turn("system", "Be brief.\nBe kind."), turn("user", "a"), turn("assistant", "b\nc"), turn("user", "d")]
    several = [turn("system", "Be brief."), turn("system", "Be kind."), turn("user", "a"), turn("assistant", "b"),
               turn("assistant", "c"), turn("user", "d")]
    prompt, _ = render_messages("llava_v1", several)
    assert prompt == render_messages("llava_v1", one)[0]
    assert prompt.startswith("Be brief.\nBe kind. USER: a ASSISTANT: b\nc</s>USER: d ASSISTANT:"), prompt


def test_an_image_of_a_joined_turn_keeps_its_place():
    # The original's first turn of one image: its <image> goes in front of the turn's text (where the image's turn
    # ended, the original's rewrite leaves a blank line).
    prompt, _ = render_messages("llava_v1", [turn("user", "Look.", 1), turn("user", "What is it?")])
    assert prompt.endswith("USER: <image>\nLook.\n\nWhat is it? ASSISTANT:"), prompt
    # Two images in two turns: each turn's <image> stays after its own text.
    prompt, _ = render_messages("llava_v1", [turn("user", "A", 1), turn("user", "B", 1)])
    assert prompt.endswith("USER: A\n<image>\nB\n<image> ASSISTANT:"), prompt


def test_what_the_template_cannot_take_is_still_refused():
    with pytest.raises(ValueError, match="last message"):
        render_messages("llava_v1", [turn("user", "a"), turn("assistant", "b"), turn("assistant", "c")])


def test_the_api_takes_two_user_messages_in_a_row_for_a_llava_model():
    image = png_b64(8, 8)
    image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look."}, image_part]},
                {"role": "user", "content": "What is it?"}]
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-turns40-") as api:
        jobs = requests.post(f"{api.base_url}/v1/jobs", timeout=10, json={
            "model": "llava-v1.5-13b", "messages": [{"role": "user", "text": "Look.", "images": [image]},
                                                    {"role": "user", "text": "What is it?"}]})
        assert jobs.status_code == 202, jobs.text
        # No worker serves it here: the chat completion gets past its messages to the model's check (404), not 400.
        chat = requests.post(f"{api.base_url}/v1/chat/completions", timeout=10,
                             json={"model": "llava-v1.5-13b", "messages": messages})
        assert chat.status_code == 404 and "not served" in chat.text, chat.text
