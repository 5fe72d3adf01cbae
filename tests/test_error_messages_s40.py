"""A refusal's message named every error pydantic found: a request of 65,536 images that are not strings came back
as a 400 of 3 MB ("images.0: Input should be a valid string; images.1: ..."), and the same text went into a batch's
error file and an eval run's answer line. A refusal names the first MAX_LISTED_ERRORS errors now and counts the
rest; its `param` is still the first bad field."""

import pytest
import requests

from shared.protocol import MAX_LISTED_ERRORS, InvalidRequest, parse_request

BAD_IMAGES = 65_536


def test_a_refusal_names_the_first_errors_and_counts_the_rest():
    with pytest.raises(InvalidRequest) as refused:
        parse_request({"prompt": "x", "images": [0] * BAD_IMAGES})
    message = refused.value.message
    assert refused.value.param == "images.0"
    assert message.count("Input should be a valid string") == MAX_LISTED_ERRORS
    assert f"images.{MAX_LISTED_ERRORS - 1}: " in message and f"images.{MAX_LISTED_ERRORS}: " not in message
    assert message.endswith(f"; and {BAD_IMAGES - MAX_LISTED_ERRORS:,} more errors")
    assert len(message) < 1000


def test_a_few_errors_are_all_named():
    with pytest.raises(InvalidRequest) as refused:
        parse_request({"prompt": "x", "images": [0, 1], "temperature": "hot"})
    message = refused.value.message
    assert message.count("Input should be a valid") == 3 and "more error" not in message
    with pytest.raises(InvalidRequest) as refused:
        parse_request({"prompt": "x", "images": [0] * (MAX_LISTED_ERRORS + 1)})
    assert refused.value.message.endswith("; and 1 more error")


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/chat/completions"])
def test_the_api_answers_a_request_of_many_errors_with_a_short_message(stack, route):
    if route == "/v1/jobs":
        body = {"prompt": "x", "images": [0] * BAD_IMAGES}
    else:
        body = {"model": "default", "messages": [{"role": 1, "content": 2}] * 1000}
    answer = requests.post(f"{stack.base_url}{route}", json=body, timeout=120)
    assert answer.status_code in (400, 422), answer.text[:300]
    assert len(answer.content) < 2000, answer.text[:300]
    assert "more errors" in answer.text, answer.text[:300]
