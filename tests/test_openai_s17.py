"""OpenAI-compatible chat completions: tool_choice without tools, top_logprobs at 0, refusal content parts."""

import openai
import pytest

from test_openai import FRANCE, MODEL, job_of


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_choice_that_needs_tools_is_refused_without_tools(client, tool_choice):
    # OpenAI's 400: ignored, "required" would answer text where the client waits for a tool call.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, tool_choice=tool_choice)
    assert caught.value.param == "tool_choice"
    assert "tool_choice" in caught.value.message and "tools" in caught.value.message


def test_a_named_function_call_is_refused_without_functions(client):
    # OpenAI's older field for the same choice.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4,
                                       extra_body={"function_call": {"name": "get_weather"}})
    assert caught.value.param == "function_call" and "functions" in caught.value.message


def test_an_unknown_tool_choice_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, tool_choice="sometimes")
    assert caught.value.param == "tool_choice"


@pytest.mark.parametrize("tool_choice", ["none", "auto", None])
def test_a_tool_choice_that_calls_no_tool_is_accepted_without_tools(client, tool_choice):
    # Without tools, "none" and "auto" call none: the answer is the same text.
    completion = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8,
                                                extra_body={"tool_choice": tool_choice})
    assert "Paris" in completion.choices[0].message.content


def test_top_logprobs_at_zero_is_accepted(client):
    # OpenAI's range is 0..20, and vLLM takes 0 without logprobs: nothing to return, so nothing is refused.
    for extra in ({"top_logprobs": 0}, {"top_logprobs": 0, "logprobs": False}):
        completion = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8,
                                                    extra_body=extra)
        assert "Paris" in completion.choices[0].message.content and completion.choices[0].logprobs is None


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True, "top_logprobs": 0}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": -1}, "top_logprobs"),
])
def test_logprobs_asked_for_are_still_refused(client, extra, param):
    # The engine reports no log probabilities: an answer without them (or made up) would break the client.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, extra_body=extra)
    assert caught.value.param == param


def test_an_assistant_refusal_part_is_its_text(stack, client):
    # OpenAI's assistant content may hold refusal parts (as the model answered them): their text is the turn's.
    completion = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=1, messages=[
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
        {"role": "user", "content": "What is the capital of France?"}])
    assert completion.choices[0].finish_reason in ("stop", "length")
    prompt = job_of(stack, completion.id)["prompt"]
    assert "<|im_start|>assistant\nI can't help with that.<|im_end|>" in prompt


@pytest.mark.parametrize("part", [{"type": "refusal", "refusal": 3}, {"type": "refusal"}])
def test_a_refusal_part_without_text_is_refused(client, part):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [part]}, *FRANCE])
    assert caught.value.param == "messages[1].content[0]"


def test_a_refusal_part_in_a_user_message_is_refused(client):
    # OpenAI takes refusal parts in assistant messages only.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "refusal", "refusal": "No."}]}])
    assert caught.value.param == "messages[0].content[0]" and "assistant" in caught.value.message
