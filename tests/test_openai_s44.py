"""What an OpenAI client reads off a refusal: a 405's Allow names every method its path takes, and a model that is not
served is OpenAI's `model_not_found`."""

import openai
import pytest
import requests

from test_openai import FRANCE, MODEL


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_405_allows_every_method_its_path_takes(stack):
    # A path with a route per method answered the first route's alone: `PUT /v1/jobs/{id}` said `Allow: GET`, and a
    # client reading it did not know the job could be cancelled there.
    job_id = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Hi", "max_new_tokens": 1},
                           timeout=10).json()["id"]
    for path, allowed in ((f"/v1/jobs/{job_id}", "DELETE, GET, HEAD"), ("/v1/jobs", "GET, HEAD, POST"),
                          ("/v1/files/file-nope", "DELETE, GET, HEAD"), ("/v1/batches", "GET, HEAD, POST"),
                          # (GET and DELETE take `cancel` as a job id.)
                          ("/v1/jobs/cancel", "DELETE, GET, HEAD, POST"), ("/v1/chat/completions", "POST")):
        refused = requests.put(f"{stack.base_url}{path}", timeout=10)
        assert refused.status_code == 405 and refused.headers["Allow"] == allowed, (path, refused.headers)
        assert refused.json()["error"]["message"] == f"Invalid method for URL (PUT {path})"
    # And what it names is taken.
    assert requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).status_code == 200
    assert requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).status_code in (202, 409)
    assert requests.delete(f"{stack.base_url}/v1/files/file-nope", timeout=10).status_code == 404


def test_a_model_not_served_is_openais_model_not_found(client):
    # OpenAI answers an unknown model 404 with the code `model_not_found`, which its clients and tools test for; the
    # code was llava-queue's NO_WORKER, 2.
    for ask in (lambda: client.models.retrieve("org/gpt-4o"),
                lambda: client.chat.completions.create(model="gpt-4o", messages=FRANCE, max_tokens=1),
                lambda: client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as missing:
            ask()
        error = missing.value
        assert (error.code, error.type, error.param) == ("model_not_found", "invalid_request_error", "model"), error
    # A served model is still found, in OpenAI's shape.
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "llava-queue") and model.created > 0
    assert [listed.id for listed in client.models.list()] == [MODEL]
