"""HEAD is answered wherever GET is, and the OpenAI fields that were taken as anything and ignored (`service_tier`,
`prediction`, `reasoning_effort`, `verbosity`) are checked: accepted where ignoring them leaves the answer as it is,
refused where the model cannot do what they ask."""

import re

import openai
import pytest
import requests
from fastapi.routing import iter_route_contexts

from conftest import job_final
from test_openai import FRANCE, MODEL

# Headers a HEAD and a GET of the same resource may differ in: when they were answered, and how a body is framed.
_PER_RESPONSE = {"date", "content-length", "transfer-encoding"}


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_head_is_answered_as_get_on_every_get_route(stack):
    # Uptime checks and load balancers ask `HEAD /healthz` or `HEAD /v1/models`: FastAPI's routes take only the
    # methods they name, and every GET route of the API but the page's answered HEAD 405.
    from api.main import create_app

    job_id = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Hi", "max_new_tokens": 1},
                           timeout=10).json()["id"]
    job_final(stack, job_id)  # (its view, and its ETag, no longer change)
    values = {"job_id": job_id, "model": MODEL, "path": "app.js"}  # others: "nope", a 404 for GET and HEAD alike
    routes = [route.path for route in iter_route_contexts(create_app().router.routes) if "GET" in (route.methods or ())]
    paths = [re.sub(r"\{(\w+)(:\w+)?\}", lambda field: values.get(field[1], "nope"), path) for path in routes]
    assert {"/healthz", "/readyz", "/metrics", "/v1/models", f"/v1/models/{MODEL}", f"/v1/jobs/{job_id}",
            "/v1/batches/nope/output"} <= set(paths), paths
    for path in paths:
        got = requests.get(f"{stack.base_url}{path}", timeout=10)
        head = requests.head(f"{stack.base_url}{path}", timeout=10)
        assert head.status_code == got.status_code, (path, head.status_code, got.status_code, head.headers)
        assert head.content == b"", path
        assert head.headers.keys() - _PER_RESPONSE == got.headers.keys() - _PER_RESPONSE, (path, head.headers)
        assert head.headers["content-type"] == got.headers["content-type"], path
    for path in ("/v1/models", f"/v1/jobs/{job_id}"):
        got = requests.get(f"{stack.base_url}{path}", timeout=10)
        head = requests.head(f"{stack.base_url}{path}", timeout=10)
        assert head.headers["content-length"] == str(len(got.content)), path
    etag = head.headers["etag"]
    unchanged = requests.head(f"{stack.base_url}/v1/jobs/{job_id}", headers={"If-None-Match": etag}, timeout=10)
    assert unchanged.status_code == 304


def test_a_405_allows_head_where_it_allows_get(stack):
    refused = requests.put(f"{stack.base_url}/v1/models", timeout=10)
    assert refused.status_code == 405 and refused.headers["Allow"] == "GET, HEAD", refused.headers
    # A path that takes no GET takes no HEAD either, and says so.
    head = requests.head(f"{stack.base_url}/v1/chat/completions", timeout=10)
    assert head.status_code == 405 and head.headers["Allow"] == "POST", head.headers


def test_a_service_tier_is_answered_as_openai_answers_it(client):
    # The answer names the tier that served a request that named one, as OpenAI's does (it was null); every request
    # is served at the default tier.
    completion = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=4,
                                                service_tier="flex")
    assert completion.service_tier == "default"
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=4,
                                                 service_tier="auto", stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks and all(chunk.service_tier == "default" for chunk in chunks)
    unnamed = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=1)
    assert unnamed.service_tier is None
    # A tier OpenAI does not have is refused, as OpenAI refuses it (it was taken, whatever it said).
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1, extra_body={"service_tier": "fast"})
    assert refused.value.param == "service_tier" and "'priority'" in refused.value.message


def test_a_prediction_and_store_leave_the_answer_as_it_is(client):
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    predicted = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8, store=True,
                                               prediction={"type": "content", "content": "The capital is Paris."})
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    # Its shape is checked, as OpenAI checks it: a prediction in another shape was ignored without a word.
    for prediction, param in (({"type": "content", "content": 5}, "prediction.content"),
                              ({"type": "text", "content": "Paris"}, "prediction.type"),
                              ("Paris", "prediction")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1,
                                           extra_body={"prediction": prediction})
        assert refused.value.param == param, refused.value.message


@pytest.mark.parametrize("field, asked, neutral", [("reasoning_effort", "low", "none"),
                                                   ("verbosity", "low", "medium")])
def test_what_a_model_that_does_not_reason_cannot_do_is_refused(client, field, asked, neutral):
    # OpenAI refuses these for its models that do not reason; they were ignored, and the answer came back as if
    # they had been heeded.
    for endpoint in (lambda **fields: client.chat.completions.create(messages=FRANCE, **fields),
                     lambda **fields: client.completions.create(prompt="Hi", **fields)):
        with pytest.raises(openai.BadRequestError) as refused:
            endpoint(model=MODEL, max_tokens=1, extra_body={field: asked})
        assert refused.value.param == field and "not supported" in refused.value.message
        # Its neutral value asks for nothing the model does not do.
        assert endpoint(model=MODEL, max_tokens=1, extra_body={field: neutral}).choices
