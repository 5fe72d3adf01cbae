"""Images through the whole stack: HTTP → Redis → a worker serving a (tiny, random) LLaVA checkpoint → answers.

What the API can see wrong in an image (not base64, not an image, truncated, too many pixels)
is refused at submission with 422; what only the worker can know (the image count against the
model's own prompt, pixel data that does not decode) fails that job alone, with a clear error,
while its batch-mates answer exactly as they would alone.
"""

import json
import time

import pytest
import requests

from llava_fixtures import TOKENS_PER_IMAGE, b64, png_b64, png_bytes, png_claiming_size, png_with_corrupt_pixels

CAT = png_b64(70, 40, seed=21)
DOG = png_b64(40, 90, seed=22)
SKY = png_b64(56, 56, seed=23)
CORRUPT = b64(png_with_corrupt_pixels())
MISMATCH = "Number of images does not match number of <image> tokens in prompt"


def submit(stack, **job) -> str:
    response = requests.post(f"{stack.base_url}/v1/jobs", json=job, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_until(stack, job_id: str, timeout: float = 120.0) -> dict:
    """The job's record once it has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s\n{stack.logs()}")


def ask(text: str, *images: str, **extra) -> dict:
    """A one-turn chat job (the worker renders it with the model's LLaVA template)."""
    return {"messages": [{"role": "user", "text": text, "images": list(images)}], "temperature": 0,
            "max_new_tokens": 12, **extra}


def run_alone(stack, job: dict) -> dict:
    finished = wait_until(stack, submit(stack, **job))
    assert finished["status"] == "succeeded", finished
    return finished


def test_a_job_with_one_image_succeeds(tiny_llava_stack):
    job = run_alone(tiny_llava_stack, ask("What is in this picture?", CAT))
    assert job["model"] == "llava-v1.5-tiny"
    # The llava_v1 template puts the image first; the prompt is echoed as rendered, with <image>.
    assert job["prompt"].endswith("USER: <image>\nWhat is in this picture? ASSISTANT:")
    assert job["usage"]["completion_tokens"] >= 1 and job["error_code"] == 0
    # Every image feature is a prompt position, counted against the context and the batch budget.
    assert job["usage"]["prompt_tokens"] > TOKENS_PER_IMAGE


def test_a_job_with_two_images_succeeds(tiny_llava_stack):
    prompt = "USER: <image>\n<image>\nWhich of the two is brighter? ASSISTANT:"
    two = run_alone(tiny_llava_stack, {"prompt": prompt, "images": [CAT, DOG], "temperature": 0, "max_new_tokens": 12})
    one_image_twice = run_alone(tiny_llava_stack, {"prompt": prompt, "images": [CAT, CAT], "temperature": 0,
                                                   "max_new_tokens": 12})
    assert two["usage"]["prompt_tokens"] == one_image_twice["usage"]["prompt_tokens"]
    assert two["usage"]["prompt_tokens"] >= 2 * TOKENS_PER_IMAGE


def test_a_first_turn_with_two_images_where_its_text_places_them_succeeds(tiny_llava_stack):
    # The first turn's text placed both images; rendering kept one <image> of two, and the job always failed
    # ("2 images, 1 <image>"), while the same turn later in a chat, or the same prompt sent rendered, answered.
    text = "Left: <image> Right: <image> Which is brighter?"
    chat = run_alone(tiny_llava_stack, ask(text, CAT, DOG))
    assert chat["prompt"].endswith(f"USER: {text} ASSISTANT:")
    rendered = run_alone(tiny_llava_stack, {"prompt": chat["prompt"], "images": [CAT, DOG], "temperature": 0,
                                            "max_new_tokens": 12, "stop": "</s>"})
    assert chat["text"] == rendered["text"]


def test_a_data_url_image_is_the_same_image(tiny_llava_stack):
    plain = run_alone(tiny_llava_stack, ask("Describe it.", SKY))
    data_url = run_alone(tiny_llava_stack, ask("Describe it.", f"data:image/png;base64,{SKY}"))
    assert data_url["text"] == plain["text"]


def test_batched_image_jobs_answer_as_alone_and_bad_ones_fail_alone(tiny_llava_stack):
    good = [
        ask("What is in this picture?", CAT),
        ask("What is in this picture?", DOG),
        ask("Describe the sky.", SKY, max_new_tokens=20),
        ask("Hello, how are you?"),  # text only, in the same batch
        {"prompt": "USER: <image> or <image>? ASSISTANT:", "images": [DOG, SKY], "temperature": 0,
         "max_new_tokens": 16},
        ask("What is in this picture?", CAT, image_process_mode="Pad"),
        # A turn of two images and no <image> gets one for each (it got one for both, and failed).
        ask("Compare these.", CAT, DOG),
    ]
    bad = {
        "more images than <image>": ({"prompt": "USER: <image> hi ASSISTANT:", "images": [CAT, DOG],
                                      "temperature": 0}, MISMATCH),
        "fewer images than <image>": ({"prompt": "USER: <image> <image> hi ASSISTANT:", "images": [CAT],
                                       "temperature": 0}, MISMATCH),
        # A turn's text names one image of its two.
        "two images in a turn that names one": (ask("Compare <image> with the other.", CAT, DOG), MISMATCH),
        "pixel data that does not decode": (ask("What is this?", CORRUPT), "image 0 could not be decoded"),
    }
    alone = [run_alone(tiny_llava_stack, job)["text"] for job in good]

    # Now all at once, the bad ones between the good ones.
    jobs = good[:3] + [job for job, _ in bad.values()] + good[3:]
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/jobs/bulk", json={"jobs": jobs}, timeout=30)
    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    finished = [wait_until(tiny_llava_stack, job_id) for job_id in ids]
    good_done, bad_done = finished[:3] + finished[3 + len(bad):], finished[3:3 + len(bad)]
    for job, text in zip(good_done, alone):
        assert job["status"] == "succeeded", job
        assert job["text"] == text
    for job, (name, (_, message)) in zip(bad_done, bad.items()):
        assert job["status"] == "failed", (name, job)
        assert message in job["error"], (name, job["error"])
        assert job["error_code"] == 4 and job["finish_reason"] == "error"
    assert all(worker["model"] == "llava-v1.5-tiny" for worker in
               requests.get(f"{tiny_llava_stack.base_url}/healthz", timeout=10).json()["workers"])


@pytest.mark.parametrize(("name", "image", "message"), [
    ("not base64", "this is not base64!", "is not valid base64"),
    ("base64 of a text file", b64(b"Dear user,\nthis is a text file.\n"), "is not an image file"),
    ("a truncated PNG", b64(png_bytes(64, 64, seed=5)[:400]), "is not a readable image file"),
    ("over the pixel limit", b64(png_claiming_size(10_000, 8_000)), "is too large: 10000x8000"),
])
def test_images_the_api_can_tell_are_bad_get_422(tiny_llava_stack, name, image, message):
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/jobs", json=ask("What is it?", image), timeout=10)
    assert response.status_code == 422, (name, response.text)
    error = response.json()["error"]
    assert "images" in error["message"] and message in error["message"], (name, error)


def test_image_tokens_count_against_the_context(tiny_llava_stack, tiny_llava_dir):
    from transformers import AutoTokenizer

    # Text that fits the 512-token context alone, but not with an image's 16 features.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir)
    text = tokenizer.decode(tokenizer("ab " * 600).input_ids[1:500])
    text_only = wait_until(tiny_llava_stack, submit(tiny_llava_stack, prompt=text, temperature=0, max_new_tokens=4))
    assert text_only["status"] == "succeeded" and text_only["text"] != ""
    with_image = wait_until(tiny_llava_stack, submit(tiny_llava_stack, prompt=text + "<image>", images=[SKY],
                                                     temperature=0, max_new_tokens=4))
    assert with_image["status"] == "succeeded"
    assert with_image["text"] == "Exceeds max token length. Please start a new conversation, thanks."


def test_the_original_worker_endpoint_takes_images(tiny_llava_stack):
    prompt = "USER: <image>\nWhat is in this picture? ASSISTANT:"
    response = requests.post(f"{tiny_llava_stack.base_url}/worker_generate_stream", stream=True, timeout=60,
                             json={"prompt": prompt, "images": [CAT], "temperature": 0, "max_new_tokens": 12,
                                   "stop": "</s>"})
    frames = [json.loads(chunk) for chunk in response.iter_lines(delimiter=b"\0") if chunk]
    assert frames and all(frame["error_code"] == 0 for frame in frames)
    # The prompt comes back as sent (with <image>), as the original's did.
    assert frames[-1]["text"].startswith(prompt)
    same = run_alone(tiny_llava_stack, {"prompt": prompt, "images": [CAT], "temperature": 0, "max_new_tokens": 12,
                                        "stop": "</s>"})
    assert frames[-1]["text"][len(prompt):] == same["text"]
    # A count that does not match is an error frame there too.
    response = requests.post(f"{tiny_llava_stack.base_url}/worker_generate_stream", stream=True, timeout=60,
                             json={"prompt": prompt, "images": [CAT, DOG], "temperature": 0})
    frames = [json.loads(chunk) for chunk in response.iter_lines(delimiter=b"\0") if chunk]
    assert frames[-1]["error_code"] != 0
