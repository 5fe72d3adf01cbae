"""What a probe of generation parameters found (the twenty-eighth session), each checked on the real stack: chat
completions take numbers, not booleans, and refuse text that is not valid Unicode with a 400 as every other bad
field there; a body that is not UTF-8 is malformed JSON."""

import requests

from test_protocol_compat import TEXT_MODEL


def chat(stack, body: bytes | dict) -> requests.Response:
    if isinstance(body, dict):
        return requests.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30)
    return requests.post(f"{stack.base_url}/v1/chat/completions", data=body, timeout=30,
                         headers={"Content-Type": "application/json"})


def test_chat_completions_take_numbers_not_booleans(stack):
    # pydantic read true as 1: OpenAI refuses a boolean there.
    for field in ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed"):
        response = chat(stack, {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], field: True})
        assert response.status_code == 400, (field, response.text)
        error = response.json()["error"]
        assert error["param"] == field and error["message"] == f"{field}: must be a number, got true", error


def test_text_that_is_not_valid_unicode_is_a_400_in_every_field_of_a_chat_completion(stack):
    # A stop string with a lone surrogate was a 422 (the job submission's check), a message's content a 400.
    for fields, param in ((b'"stop": ["\\ud800"]', "stop"), (b'"stop": "a\\udfff"', "stop")):
        body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], %s}' % (TEXT_MODEL.encode(), fields)
        response = chat(stack, body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "not valid Unicode" in error["message"], error


def test_a_body_that_is_not_utf8_is_malformed_json(stack):
    # It was "There was an error parsing the body", type http_error: not what every other bad body gets.
    body = '{"prompt": "caf\u00e9"}'.encode("latin-1")
    for path in ("/v1/jobs", "/v1/chat/completions"):
        response = requests.post(f"{stack.base_url}{path}", data=body, timeout=10,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["message"].startswith("malformed JSON: the body is not UTF-8 text"), (path, error)
        assert (error["type"], error["code"]) == ("invalid_request_error", 4), (path, error)
