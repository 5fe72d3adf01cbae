"""Polling a job as a client library or a dashboard does: what `GET /v1/jobs/{id}` tells caches, and conditional
polls (`If-None-Match`) that cost no body while the job has not changed."""

import requests

from conftest import job_final


def submit(stack, **fields) -> str:
    answer = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Count: one, two,", "temperature": 0,
                                                               **fields}, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_a_poll_tells_caches_to_revalidate_and_offers_an_etag(stack):
    """A proxy or browser cache between a dashboard and the API must not answer a poll from a stored copy (the job
    moves on), nor share one key's job with another client: every answer says `private, no-cache` and has an ETag."""
    job_id = submit(stack, max_new_tokens=4)
    first = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
    assert first.status_code == 200
    cache_control = {part.strip() for part in first.headers["Cache-Control"].split(",")}
    assert {"private", "no-cache"} <= cache_control
    assert first.headers["ETag"].startswith('"') and first.headers["ETag"].endswith('"')
    assert first.json()["id"] == job_id


def test_a_conditional_poll_is_answered_304_until_the_job_changes(stack):
    """A client that sends back the ETag it got gets 304 with no body while the job is as it was, and the new state
    (200, another ETag) once it changed: here, from queued or running to its end."""
    url = f"{stack.base_url}/v1/jobs/{submit(stack, max_new_tokens=24)}"
    before = requests.get(url, timeout=10)
    assert before.json()["status"] in ("queued", "running")
    job_final(stack, before.json()["id"])

    ended = requests.get(url, headers={"If-None-Match": before.headers["ETag"]}, timeout=10)
    assert ended.status_code == 200 and ended.json()["status"] == "succeeded"
    assert ended.headers["ETag"] != before.headers["ETag"]

    for if_none_match in (ended.headers["ETag"], f'"other", W/{ended.headers["ETag"]}', "*"):
        unchanged = requests.get(url, headers={"If-None-Match": if_none_match}, timeout=10)
        assert unchanged.status_code == 304, if_none_match
        assert unchanged.content == b""
        assert unchanged.headers["ETag"] == ended.headers["ETag"]
        assert "no-cache" in unchanged.headers["Cache-Control"]

    other = requests.get(url, headers={"If-None-Match": '"not-this-one"'}, timeout=10)
    assert other.status_code == 200 and other.json() == ended.json()
