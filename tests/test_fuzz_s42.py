"""Odd input through the real entry points: a clear refusal (a 4xx, or a job failed with error_code 4 and a message)
that costs nothing the batch-mates need, and the jobs beside it answer as they would alone."""

import io
import struct
import threading
import uuid

import pytest
import requests
from PIL import Image

from conftest import job_final
from llava_fixtures import b64, png_b64, png_claiming_size
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest

CAT = png_b64(70, 40, seed=21)


def normal(**extra) -> dict:
    return {"messages": [{"role": "user", "text": "What is in this picture?", "images": [CAT]}], "temperature": 0,
            "max_new_tokens": 8, **extra}


def ico_holding(frame: bytes) -> bytes:
    """An ICO whose directory names one 16x16 image, `frame` (a PNG file)."""
    return struct.pack("<HHHBBBBHHII", 0, 1, 1, 16, 16, 0, 0, 1, 32, len(frame), 22) + frame


def icns_holding(frame: bytes) -> bytes:
    """An ICNS whose one entry is a 16x16 PNG ("icp4"), `frame`."""
    entry = b"icp4" + struct.pack(">I", 8 + len(frame)) + frame
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def test_an_icon_is_refused_for_the_image_it_holds_before_any_pixel_is_decoded(tiny_llava_stack):
    # An icon's directory gives its size (16x16 here) and PIL decodes the file it holds at that file's own size: an
    # ICO of 657 KB holding a 13000x13000 PNG was decoded while it was opened (676 MB, 2 s of the API for each request
    # that sent it), then refused; an ICNS passed the API and the worker decoded it past its pixel budget. This PNG
    # only claims 8000x8000: decoding it fails, so a refusal that names its size shows it was never decoded.
    inner = png_claiming_size(8000, 8000)
    for icon in (icns_holding(inner), ico_holding(inner)):
        response = requests.post(f"{tiny_llava_stack.base_url}/v1/jobs", json=normal(max_new_tokens=2) | {
            "messages": [{"role": "user", "text": "What is it?", "images": [b64(icon)]}]}, timeout=30)
        assert response.status_code == 422, response.text
        assert ("image 0 is too large: an icon holding a 8000x8000 image = 64000000 pixels; the limit is 50000000"
                in response.json()["error"]["message"])
    # An icon as icons are is read as before, beside a job that answers as it does alone.
    buffer = io.BytesIO()
    Image.new("RGBA", (48, 48), (200, 30, 30, 255)).save(buffer, "ICO", sizes=[(16, 16), (48, 48)])
    alone = requests.post(f"{tiny_llava_stack.base_url}/v1/jobs", json=normal(), timeout=30).json()["id"]
    expected = job_final(tiny_llava_stack, alone)["text"]
    ids = requests.post(f"{tiny_llava_stack.base_url}/v1/jobs/bulk", json={"jobs": [
        normal(), normal() | {"messages": [{"role": "user", "text": "And this?", "images": [b64(buffer.getvalue())]}]},
    ]}, timeout=30).json()["ids"]
    beside, icon = (job_final(tiny_llava_stack, job_id) for job_id in ids)
    assert (beside["status"], beside["text"]) == ("succeeded", expected), beside
    assert (icon["status"], icon["error_code"]) == ("succeeded", 0), icon


@pytest.fixture(scope="module")
def store(redis_server):
    store = JobStore.from_url(redis_server.url, prefix=f"llq-s42f-{uuid.uuid4().hex[:8]}")
    yield store
    store.redis.close()


def run_beside(store, loaded, odd: GenerateRequest, usual: GenerateRequest) -> tuple[dict, dict]:
    """Run `odd` and `usual` as jobs of one JobRunner on a real engine, at once; their records once ended."""
    from workers.engine import LLMEngine
    from workers.generation import JobRunner

    runner = JobRunner(store, loaded, "w-s42")
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=4, max_model_len=loaded.context_len,
                       on_step=runner.publish)
    runner.attach(engine)
    engine.start()
    try:
        ids = [store.create(request, "interactive")[0] for request in (odd, usual)]
        threads = [threading.Thread(target=runner.run, args=(job_id,)) for job_id in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return store.get(ids[0]), store.get(ids[1])
    finally:
        engine.shutdown()


# A chat template as Llama 2's and Mistral's are: it refuses turns whose roles do not alternate.
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")


def test_turns_the_chat_template_refuses_fail_the_job_as_a_bad_request(store, tiny_llava_family):
    # The template's refusal (jinja2's TemplateError) failed the job as a server error: code 1, and a 500 on OpenAI's
    # route, which the openai package sends again, twice.
    from workers.builder import load_model

    loaded = load_model(str(tiny_llava_family.base), device="cpu", dtype="float32")
    loaded.tokenizer.chat_template = ALTERNATING
    refused, usual = run_beside(
        store, loaded, GenerateRequest(messages=[{"role": "user", "text": "Hi"}, {"role": "user", "text": "Hi?"}]),
        GenerateRequest(messages=[{"role": "user", "text": "Describe the sky."}], temperature=0, max_new_tokens=6))
    assert (refused["status"], refused["error_code"]) == ("failed", ErrorCode.INVALID_REQUEST), refused
    assert refused["error"] == ("the model's chat template refuses these messages: Conversation roles must alternate "
                                "user/assistant/user/assistant/...")
    assert usual["status"] == "succeeded" and usual["completion_tokens"] == 6, usual


def test_an_empty_prompt_fails_as_a_bad_request_where_the_llava_tokenizer_adds_no_bos(store, tiny_llava_family):
    # A LLaVA model's prompt is tokenized around its images; with a tokenizer that adds no BOS (Qwen2's, as
    # llava-interleave's), an empty prompt made no token, and the engine's refusal failed the job as a server error
    # (code 1: "NETWORK ERROR" on the original's stream, a 500 on OpenAI's), which tells a client to try again.
    from tokenizers import processors

    from workers.builder import load_model

    loaded = load_model(str(tiny_llava_family.original), device="cpu", dtype="float32")
    loaded.tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert loaded.vision is not None and loaded.tokenizer("").input_ids == []
    refused, usual = run_beside(store, loaded, GenerateRequest(prompt="", max_new_tokens=4),
                                GenerateRequest(prompt="USER: <image>\nWhat is it? ASSISTANT:", images=[CAT],
                                                temperature=0, max_new_tokens=6))
    assert (refused["status"], refused["error_code"]) == ("failed", ErrorCode.INVALID_REQUEST), refused
    assert refused["error"] == "the prompt is empty: it makes no token, and generation starts from at least one"
    assert usual["status"] == "succeeded" and usual["completion_tokens"] == 6, usual
