"""The API decodes an image at submission only when PIL's structural check fails on it (to refuse a file the worker
could not decode either), and such decoding was unbounded: a crafted PNG of 190 KB (7000x7000 black, its end chunk
cut off) decodes 49 M pixels in half a second, so a bulk of 64 MiB of them held an API core for three minutes. A
submission's images share CHECK_DECODE_PIXELS now; past it an image is left to the worker."""

import base64
import time

import pytest
import requests
from pydantic import ValidationError

from shared.protocol import CHECK_DECODE_PIXELS, BulkJobRequest, GenerateRequest
from test_request_bounds_s38 import png_without_end

SIDE = 7000  # 49 M pixels: two fit in the budget, a third does not
assert 2 * SIDE * SIDE <= CHECK_DECODE_PIXELS < 3 * SIDE * SIDE


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    # Its end chunk cut off: the structural check fails, the pixels decode (the original accepts it).
    no_end = png_without_end(SIDE, SIDE)
    # Cut in its data as well: neither the check nor decoding goes through.
    raw = base64.b64decode(no_end)
    truncated = base64.b64encode(raw[:len(raw) // 2]).decode()
    return {"no_end": no_end, "truncated": truncated}


def job(image: str) -> dict:
    return {"prompt": "<image>\nWhat is this?", "images": [image], "max_new_tokens": 1}


def test_a_request_whose_image_decodes_nowhere_is_refused_at_submission(images):
    with pytest.raises(ValidationError, match="image 0 is not a readable image file"):
        GenerateRequest.model_validate(job(images["truncated"]))
    GenerateRequest.model_validate(job(images["no_end"]))
    # Each request has a budget of its own: the one before spent none of this one's.
    with pytest.raises(ValidationError, match="image 0 is not a readable image file"):
        GenerateRequest.model_validate(job(images["truncated"]))


def test_a_bulks_jobs_share_one_budget_of_decoding(images):
    started = time.process_time()
    bulk = BulkJobRequest.model_validate({"jobs": [job(images["no_end"]), job(images["no_end"]),
                                                   job(images["truncated"])]})
    # The third is past the budget: not decoded here, left to the worker (which fails its job, naming the image).
    assert len(bulk.jobs) == 3
    # Two images decoded, not twenty: the CPU of a bulk of them is bounded (generously, for a loaded machine).
    assert time.process_time() - started < 10
    # A bulk whose first image decodes nowhere is still refused: it is within the budget.
    with pytest.raises(ValidationError, match="image 0 is not a readable image file"):
        BulkJobRequest.model_validate({"jobs": [job(images["truncated"]), job(images["no_end"])]})


def test_a_bulk_of_crafted_images_is_not_decoded_past_the_budget(stack, images):
    answer = requests.post(f"{stack.base_url}/v1/jobs/bulk", timeout=120,
                           json={"jobs": [job(images["no_end"])] * 2 + [job(images["truncated"])] * 30})
    assert answer.status_code == 202, answer.text[:300]
    for job_id in answer.json()["ids"]:
        requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)


def test_a_chat_completions_images_share_one_budget_of_decoding(images):
    from api.routes.openai import parse_chat_request

    def image(name: str) -> dict:
        return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{images[name]}"}}

    # Each image part was checked with a budget of its own (and again as the job request was): 16 crafted images, 16
    # decodes, 6 s of the API's CPU for one request. The third here is past the budget: left to the worker.
    parts = [{"type": "text", "text": "What are these?"}, image("no_end"), image("no_end"), image("truncated")]
    _, request = parse_chat_request({"model": "some-llava-model", "messages": [{"role": "user", "content": parts}]})
    assert len(request.all_images()) == 3
