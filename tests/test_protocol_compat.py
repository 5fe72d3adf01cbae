"""Drop-in compatibility of request validation: what the original LLaVA worker serves is served here too.

The original (llava-torch 1.2.2.post1, `llava/serve/model_worker.py`) reads `temperature` and `top_p` with `float()`
and samples only when `temperature > 0.001`; it decodes images with `base64.b64decode`, which skips characters
outside the base64 alphabet (spaces, line breaks); and a worker whose model name lacks "llava" never reads `images`.
The stack tests run the real API, Redis and a worker with SmolLM2-135M-Instruct (a text-only model).
"""

import json

import pytest
import requests

from llava_fixtures import b64, png_bytes
from shared.protocol import CONTEXT_OVERFLOW_MSG, GenerateRequest, InvalidRequest, check_images, parse_request
from workers.images import decode_image

TEXT_MODEL = "SmolLM2-135M-Instruct"
# The longest `model` taken: two 255-byte path components joined by "_", the longest name the original derives.
MAX_MODEL_CHARS = 512


def stream(stack, payload: dict) -> tuple[int, list[dict]]:
    """POST /worker_generate_stream and read its frames as the original web server does."""
    response = requests.post(f"{stack.base_url}/worker_generate_stream", json=payload, stream=True, timeout=60)
    frames = [json.loads(chunk) for chunk in response.iter_lines(delimiter=b"\0") if chunk]
    return response.status_code, frames


def spaced(data: str) -> str:
    """Base64 as some encoders and hand-made payloads send it: wrapped lines, indentation, spaces and tabs."""
    lines = [data[i:i + 60] for i in range(0, len(data), 60)]
    return "\r\n  ".join(" ".join((line[:30], line[30:])) for line in lines) + "\n\t"


# 1. temperature and top_p, read as the original reads them.

def test_a_negative_temperature_is_greedy_as_in_the_original():
    import torch

    from workers.engine.sampling import sample

    request = parse_request({"prompt": "hi", "temperature": -1})
    assert request.temperature == -1  # kept: the engine samples only above 0.001, as the original's do_sample
    # Logits nearly flat, the highest last: a sampled row (at -1, the order reversed) would seldom pick the top.
    logits = torch.linspace(0.0, 0.5, 64).repeat(16, 1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(16)]
    assert sample(logits, [request.temperature] * 16, [1.0] * 16, generators).tolist() == [63] * 16


def test_top_p_over_one_keeps_the_whole_distribution_as_in_the_original():
    # transformers adds no top-p warper for top_p >= 1: 2 samples as 1 does.
    assert parse_request({"prompt": "hi", "top_p": 2}).top_p == 1.0


def test_a_negative_top_p_is_refused_only_where_the_original_fails_on_it():
    # Greedy, the original never reads top_p.
    assert parse_request({"prompt": "hi", "temperature": 0, "top_p": -0.5}).top_p == -0.5
    # Sampling, transformers' TopPLogitsWarper raises in the original's generation thread (an error frame after
    # its 15 s streamer timeout): here a 422 that says why, at once.
    with pytest.raises(InvalidRequest, match=r"top_p: .*between 0 and 1 when sampling") as refused:
        parse_request({"prompt": "hi", "temperature": 0.7, "top_p": -0.5})
    assert refused.value.param == "top_p"


def test_negative_temperature_answers_like_temperature_zero(stack):
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    payload = {"model": TEXT_MODEL, "prompt": prompt, "max_new_tokens": 8, "stop": "<|im_end|>"}
    answers = []
    for temperature, top_p in ((0, 0.7), (-1, 0.7), (-0.5, 2)):
        status, frames = stream(stack, {**payload, "temperature": temperature, "top_p": top_p})
        assert status == 200 and frames and frames[-1]["error_code"] == 0, frames
        answers.append(frames[-1]["text"])
    assert answers[0].startswith(prompt) and answers[0] != prompt
    assert answers[1] == answers[0] == answers[2]


# 2. Whitespace inside base64, skipped as the original's b64decode skips it.

def test_base64_with_spaces_and_line_breaks_reads_as_the_original_reads_it():
    data = b64(png_bytes(30, 20, seed=4))
    check_images([spaced(data)])
    assert decode_image(spaced(data)).tobytes() == decode_image(data).tobytes()
    assert decode_image(f"data:image/png;base64,{spaced(data)}").tobytes() == decode_image(data).tobytes()


def test_base64_that_is_not_an_image_is_still_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="image 0 is not an image file"):
        check_images([spaced(b64(b"Just a text file, not an image.\n"))])
    with pytest.raises(ValueError, match="image 0 is not valid base64"):
        check_images(["aGVsbG8"])  # bad padding: the original's b64decode fails on it too


def test_the_api_takes_an_image_with_line_breaks_in_its_base64(stack):
    response = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "<image>\nhi", "max_new_tokens": 1,
                                                               "images": [spaced(b64(png_bytes(8, 8)))]},
                             timeout=10)
    assert response.status_code == 202, response.text


def test_a_llava_worker_answers_an_image_with_spaces_as_the_same_image_without(tiny_llava_stack):
    image = b64(png_bytes(70, 40, seed=21))
    prompt = "USER: <image>\nWhat is in this picture? ASSISTANT:"
    answers = []
    for data in (image, spaced(image)):
        status, frames = stream(tiny_llava_stack, {"model": "llava-v1.5-tiny", "prompt": prompt, "temperature": 0,
                                                   "max_new_tokens": 8, "stop": "</s>", "images": [data]})
        assert status == 200 and frames and frames[-1]["error_code"] == 0, frames
        answers.append(frames[-1]["text"])
    assert answers[0].startswith(prompt) and answers[1] == answers[0]


def test_max_new_tokens_is_read_as_the_original_reads_it():
    # The original: `min(int(params.get("max_new_tokens", 256)), 1024)`, then a request left with fewer than one
    # new token gets its "Exceeds max token length" message. Both were a 422 here.
    assert parse_request({"prompt": "hi", "max_new_tokens": 100.5}).max_new_tokens == 100
    assert parse_request({"prompt": "hi", "max_new_tokens": -5}).max_new_tokens == 0
    assert parse_request({"prompt": "hi", "max_new_tokens": "7"}).max_new_tokens == 7
    assert parse_request({"prompt": "hi", "max_new_tokens": " -3 "}).max_new_tokens == 0  # int(" -3 ") is -3: a 422
    assert parse_request({"prompt": "hi", "max_new_tokens": "2000"}).max_new_tokens == 1024


def test_a_model_name_with_a_control_character_is_refused():
    # kombu's priority lists are "<queue>\x06\x16<n>": a job for "M\x06\x163" ran on a worker of model M.
    for model in ("SmolLM2-135M-Instruct\x06\x163", "a\nb", "a\x7fb"):
        with pytest.raises(InvalidRequest, match="model: holds a control character"):
            parse_request({"prompt": "hi", "model": model})
    assert parse_request({"prompt": "hi", "model": "llava-v1.5-13b (café)"}).model == "llava-v1.5-13b (café)"
    with pytest.raises(InvalidRequest, match="max_new_tokens"):  # int("abc") fails in the original too
        parse_request({"prompt": "hi", "max_new_tokens": "abc"})


def test_a_negative_max_new_tokens_gets_the_originals_context_message(stack):
    status, frames = stream(stack, {"model": TEXT_MODEL, "prompt": "hi", "max_new_tokens": -5})
    assert status == 200 and frames == [{"text": "hi" + CONTEXT_OVERFLOW_MSG, "error_code": 0}], frames


# 3. A text-only model ignores images, as the original's text-only worker does.

def test_images_are_read_only_for_a_model_that_reads_them():
    bad = ["not base64!"]
    GenerateRequest(model=TEXT_MODEL, prompt="<image>\nhi", images=bad)
    GenerateRequest(model=TEXT_MODEL, messages=[{"role": "user", "text": "hi", "images": bad}])
    for model in ("llava-v1.5-7b", "LLaVA-NeXT", None):  # a LLaVA name, or none: any worker may take the job
        with pytest.raises(ValueError, match="image 0 is not valid base64"):
            GenerateRequest(model=model, prompt="<image>\nhi", images=bad)
        with pytest.raises(ValueError, match="image 0 is not valid base64"):
            GenerateRequest(model=model, messages=[{"role": "user", "text": "hi", "images": bad}])
    with pytest.raises(ValueError, match="17 images; the limit is 16"):  # the count bound stays
        GenerateRequest(model=TEXT_MODEL, prompt="hi", images=bad * 17)


def test_a_text_only_model_answers_a_request_with_a_bad_image(stack):
    prompt = "<image>\nSay hello."
    status, frames = stream(stack, {"model": TEXT_MODEL, "prompt": prompt, "temperature": 0, "max_new_tokens": 4,
                                    "stop": "<|im_end|>", "images": ["not base64!"]})
    assert status == 200, frames
    assert frames and all(frame["error_code"] == 0 for frame in frames), frames
    assert frames[-1]["text"].startswith(prompt)


# 4. A bound on `model`.

def test_a_model_name_over_the_limit_is_refused_with_a_clear_message():
    GenerateRequest(model="m" * MAX_MODEL_CHARS, prompt="hi")
    with pytest.raises(InvalidRequest, match=f"model: is {MAX_MODEL_CHARS + 1} characters long; "
                                             f"the limit is {MAX_MODEL_CHARS}") as refused:
        parse_request({"model": "m" * (MAX_MODEL_CHARS + 1), "prompt": "hi"})
    assert refused.value.param == "model" and refused.value.status == 422


def test_the_api_refuses_a_model_name_over_the_limit(stack):
    long_name = "m" * 100_000
    response = requests.post(f"{stack.base_url}/v1/jobs", json={"model": long_name, "prompt": "hi"}, timeout=10)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("model: is 100000 characters long")
    status, frames = stream(stack, {"model": long_name, "prompt": "hi"})
    assert status == 422 and frames[0]["text"].startswith("model: is 100000 characters long"), frames
