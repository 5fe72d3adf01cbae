"""Chat turns that OpenAI's chat API and vLLM take, and that a LLaVA model's template refused: a conversation that
opens with the assistant's turn (a chat client's greeting), a system message after the first turn, and an empty user
message. Each was a 422 at /v1/jobs and a 400 on /v1/chat/completions for a LLaVA model ("the turns start with the
user's", "role 'system' is only allowed first", "a user message needs a text or an image"), where OpenAI answers
and vLLM renders them with the llava-hf chat templates, which take turns in any order. Now a leading assistant turn
gets an empty user turn in front of it (the templates go user, assistant, user), a system message anywhere joins the
system prompt, and an empty user message is a turn with no text."""

import json
import time

import requests

from llava_fixtures import png_b64
from shared.conversation import get_template, render_messages

HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")


def turn(role: str, text: str, images: int = 0) -> dict:
    return {"role": role, "text": text, "images": images}


def test_a_conversation_that_opens_with_the_assistant_gets_an_empty_user_turn_in_front():
    greeting = [turn("assistant", "Hi! Send me a picture."), turn("user", "What is it?", 1)]
    prompt, stop = render_messages("llava_v1", greeting)
    assert prompt == HUMAN_SYSTEM + " USER:  ASSISTANT: Hi! Send me a picture.</s>USER: What is it?\n<image> ASSISTANT:"
    assert stop == "</s>"
    # Llama 2's format opens with an instruction, which carries the system prompt.
    prompt, _ = render_messages("llava_llama_2", greeting)
    assert prompt == (f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n [/INST] Hi! Send me a picture. </s>"
                      "<s>[INST] What is it?\n<image> [/INST]")
    prompt, _ = render_messages("chatml_direct", greeting)
    assert prompt == ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<|im_end|>"
                      "<|im_start|>assistant\nHi! Send me a picture.<|im_end|>"
                      "<|im_start|>user\nWhat is it?\n<image><|im_end|><|im_start|>assistant\n")


def test_a_system_message_after_the_first_turn_joins_the_system_prompt():
    messages = [turn("system", "Be brief."), turn("user", "a"), turn("assistant", "b"),
                turn("system", "Answer in French."), turn("user", "c")]
    prompt, _ = render_messages("llava_v1", messages)
    assert prompt == "Be brief.\nAnswer in French. USER: a ASSISTANT: b</s>USER: c ASSISTANT:"
    # The two user turns around a system message are one turn, as two in a row are.
    prompt, _ = render_messages("mpt", [turn("user", "a"), turn("system", "S"), turn("user", "c")])
    assert prompt == "<|im_start|>system\nS<|im_end|><|im_start|>user\na\nc<|im_end|><|im_start|>assistant\n"
    # One that comes last, after the user's turn, as well.
    prompt, _ = render_messages("llava_llama_2", [turn("user", "a"), turn("system", "S")])
    assert prompt == "[INST] <<SYS>>\nS\n<</SYS>>\n\na [/INST]"


def test_an_empty_user_message_is_a_turn_with_no_text():
    assert render_messages("llava_v1", [turn("user", "")])[0] == HUMAN_SYSTEM + " USER:  ASSISTANT:"
    assert render_messages("llava_v0", [turn("system", "S"), turn("user", "")])[0] == "S###Human: ###Assistant:"
    assert render_messages("llava_llama_2", [turn("system", "S"), turn("user", "")])[0] == (
        "[INST] <<SYS>>\nS\n<</SYS>>\n\n [/INST]")
    # The original's own conversations render as before: an empty message there is skipped (a question file's empty
    # question, as `llava-queue eval` renders it with the template).
    conv = get_template("llava_v1")
    conv.append_message(conv.roles[0], "")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == HUMAN_SYSTEM + " USER:ASSISTANT:"


def test_a_llava_model_answers_these_turns_on_the_chat_api_and_as_jobs(tiny_llava_stack):
    base = tiny_llava_stack.base_url
    image = png_b64(40, 40, seed=41)
    image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
    chats = {
        "a greeting first": [{"role": "assistant", "content": "Hi! Send me a picture."},
                             {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_part]}],
        "a system message later": [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
                                   {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        "an empty user message": [{"role": "user", "content": ""}],
    }
    for name, messages in chats.items():
        response = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "llava-v1.5-tiny", "messages": messages, "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, (name, response.text)
        assert response.json()["usage"]["completion_tokens"] >= 1, (name, response.json())
    # As a job, the prompt the worker rendered is the one above.
    job = requests.post(f"{base}/v1/jobs", timeout=10, json={
        "model": "llava-v1.5-tiny", "temperature": 0, "max_new_tokens": 4,
        "messages": [{"role": "assistant", "text": "Hi! Send me a picture."},
                     {"role": "user", "text": "What is it?", "images": [image]},
                     {"role": "system", "text": "Be brief."}]})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + 120
    while (result := requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, result
        time.sleep(0.1)
    assert result["status"] == "succeeded", result
    assert result["prompt"] == ("Be brief. USER:  ASSISTANT: Hi! Send me a picture.</s>"
                                "USER: What is it?\n<image> ASSISTANT:")


def test_an_empty_model_name_has_its_images_checked_as_no_name_does(tiny_llava_stack):
    # `"model": ""` goes to any worker, as no model does, a LLaVA one included: its images were taken unchecked (as a
    # text-only model's are), and a file that is no image failed the job at the worker with the server error frame
    # (code 1, which tells the original page to retry) instead of the refusal that names the image.
    for model in (None, ""):
        body = {"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "images": ["bm90IGFuIGltYWdl"], "temperature": 0,
                "max_new_tokens": 4, **({} if model is None else {"model": model})}
        response = requests.post(f"{tiny_llava_stack.base_url}/worker_generate_stream", json=body, timeout=60)
        frames = [json.loads(chunk) for chunk in response.content.split(b"\0") if chunk]
        assert response.status_code == 422 and len(frames) == 1, (model, response.status_code, frames)
        assert frames[0]["error_code"] == 4 and "image 0 is not an image file" in frames[0]["text"], (model, frames)
