"""An ended job's record drops its images: a poll shows the job's parameters, never its images, and the images were
most of the record, kept for its whole TTL (a day by default): 10,000 image questions of an evaluation held ~1.5 GB
of Redis after they were answered."""

import base64
import io
import uuid

from PIL import Image

from api.routes.jobs import job_view
from shared.jobs import Ending, JobStore
from shared.protocol import GenerateRequest


def png_b64(seed: int) -> str:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40 + seed).convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_job_that_ends_keeps_its_parameters_but_not_its_images(redis_server):
    store = JobStore.from_url(redis_server.url, prefix=f"llq-records-{uuid.uuid4().hex[:8]}")
    images = [png_b64(seed) for seed in range(4)]
    requests_ = {
        "prompt": GenerateRequest(prompt="<image>\n<image>\nCompare.", images=images[:2], temperature=0.3, top_p=0.9,
                                  max_new_tokens=7, stop=["###", "</s>"], seed=2**62 + 1, top_k=5),
        "messages": GenerateRequest(model="llava-v1.5-13b", messages=[
            {"role": "user", "text": "", "images": [images[2]]}, {"role": "assistant", "text": "A cat."},
            {"role": "user", "text": "Its <image> colour?", "images": [images[3]]}]),
        "text only": GenerateRequest(prompt="Hello", images=None),
    }
    job_ids = {name: store.create(request, "batch")[0] for name, request in requests_.items()}
    cancelled_at_once, _ = store.create_cancelled(requests_["prompt"], "interactive", "key-1")
    # A queued job holds its images (stored once each, JobStore.image_key): its worker reads them.
    assert store.request_of(job_ids["prompt"]).images == images[:2]
    assert [image for turn in store.request_of(job_ids["messages"]).messages for image in turn.images] == images[2:]

    # Ended by the API (cancelled while queued) and by a worker's ending alike: every ending goes through one script.
    store.cancel(job_ids["prompt"])
    store.finish_many([Ending(job_ids["messages"], "failed", "broken", 4, "error"),
                       Ending(job_ids["text only"], "succeeded", finish_reason="stop")])
    for name, job_id in [*job_ids.items(), ("prompt", cancelled_at_once)]:
        raw = store.redis.hget(store.key(job_id), "request")
        assert not any(image in raw for image in images), name
        assert len(raw) < 400, (name, len(raw))
        request = requests_[name]
        params = job_view(store.get(job_id)).params
        assert (params.temperature, params.top_p, params.max_new_tokens, params.stop, params.seed, params.top_k) == (
            request.temperature, request.top_p, request.max_new_tokens, request.stop, request.seed, request.top_k)
    # The turns are kept, their texts as sent.
    assert '"text":"Its <image> colour?"' in store.redis.hget(store.key(job_ids["messages"]), "request")
