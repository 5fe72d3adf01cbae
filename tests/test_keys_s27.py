"""With API keys on (a probe of the twenty-seventh session): feedback on another key's job is refused as unknown (it
answered with that job's prompt and text), and a WebSocket refused for its key gets the HTTP answer an HTTP request
gets (401 with the JSON body, or 429 with Retry-After), not a bare 403."""

import asyncio
import json

import pytest
import requests
import websockets

from test_limits import KEY, OTHER_KEY, api_two_keys, api_with_quotas, post  # noqa: F401 (fixtures)


def test_feedback_on_another_keys_job_is_refused_as_an_unknown_job(api_two_keys):  # noqa: F811
    stack = api_two_keys
    job_id = post(stack, {"prompt": "Secret prompt of the first key"}).json()["id"]

    def feedback(key: str, job: str) -> requests.Response:
        return requests.post(f"{stack.base_url}/v1/feedback", json={"type": "upvote", "job_id": job},
                             headers={"Authorization": f"Bearer {key}"}, timeout=10)

    foreign, unknown = feedback(OTHER_KEY, job_id), feedback(OTHER_KEY, "f" * 32)
    assert foreign.status_code == unknown.status_code == 404, foreign.text
    assert foreign.json()["error"]["message"] == unknown.json()["error"]["message"].replace("f" * 32, job_id)
    assert "Secret" not in foreign.text
    own = feedback(KEY, job_id)
    assert own.status_code == 201 and own.json()["prompt"] == "Secret prompt of the first key", own.text
    assert requests.post(f"{stack.base_url}/v1/feedback", json={"type": "upvote", "job_id": job_id},
                         timeout=10).status_code == 401


async def handshake(url: str, headers: dict | None = None) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, additional_headers=headers, open_timeout=10):
            pass
    return refused.value


@pytest.mark.parametrize("path", ["/v1/ws", "/v1/jobs/some-job/ws"])
def test_a_websocket_without_a_valid_key_is_answered_401_with_the_reason(api_two_keys, path):  # noqa: F811
    url = f"{api_two_keys.ws_url}{path}"
    for refused in [asyncio.run(handshake(url)), asyncio.run(handshake(f"{url}?api_key=wrong")),
                    asyncio.run(handshake(url, {"Authorization": "Bearer wrong"}))]:
        assert refused.response.status_code == 401, refused.response
        assert refused.response.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(refused.response.body)["error"]["message"] == \
            "a valid API key is required: send 'Authorization: Bearer <key>'"


def test_a_websocket_past_the_rate_limit_is_answered_429_with_retry_after(api_with_quotas):  # noqa: F811
    stack = api_with_quotas
    # The limit counts a clock minute's requests (6): the minute may turn between the requests that fill it and the
    # handshake, so it is filled and tried until a handshake is refused (twice at most).
    for _ in range(2):
        for _ in range(6):
            requests.get(f"{stack.base_url}/v1/jobs/x", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        try:
            refused = asyncio.run(handshake(f"{stack.ws_url}/v1/ws?api_key={KEY}"))
            break
        except pytest.fail.Exception:  # accepted: a new minute
            continue
    assert refused.response.status_code == 429 and int(refused.response.headers["Retry-After"]) >= 1
    assert "rate limit of 6 requests per minute" in json.loads(refused.response.body)["error"]["message"]
