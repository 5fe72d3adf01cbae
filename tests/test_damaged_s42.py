"""A job whose record key holds another type than a hash (a key SET by hand): the lost-task sweep ends it, and the
API answers its reads with a 500 that says so; and the original controller's model list counts against the key's
reads, as GET /v1/models does."""

import logging

import requests

from shared.celery_app import resend_lost_tasks
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest
from shared.settings import Settings
from test_limits import KEY, api_only, wait_for_a_fresh_minute  # noqa: F401 (a fixture)
from test_lost_tasks_s19 import sweep_parts


def test_the_lost_task_sweep_ends_a_queued_job_whose_record_is_of_another_type(redis_server, caplog):
    # No worker can start it: once its message was lost, it stayed in its queue for good, counted as queued, and
    # every sweep logged it as unreadable. Now the sweep ends it (it leaves its queue), and says so once.
    store, app, client, _ = sweep_parts(redis_server.url, "damaged")
    job_id, _ = store.create(GenerateRequest(prompt="Hello", max_new_tokens=2), "interactive")
    client.delete(store.key(job_id))
    client.set(store.key(job_id), "a record of another type")
    try:
        with caplog.at_level(logging.WARNING, logger="llava_queue.worker"):
            for _ in range(3):
                assert resend_lost_tasks(app, store, older_than=0) == []
        lines = [record.getMessage() for record in caplog.records if job_id in record.getMessage()]
        assert len(lines) == 1 and "ended by the lost-task sweep" in lines[0] and "holds a string" in lines[0], lines
        assert store.queue_lengths() == {"interactive": 0, "batch": 0}
        assert client.get(store.key(job_id)) == "a record of another type"  # left as it is
    finally:
        client.delete(store.key(job_id))
        client.close()


def test_reading_or_cancelling_a_job_whose_record_is_of_another_type_answers_500_saying_so(api_only):  # noqa: F811
    # Its WRONGTYPE, a Redis error, was answered 503 "the job store is unavailable, try again shortly" (Retry-After),
    # and logged as a Redis outage: a client polling or cancelling the job was told to try again for ever.
    headers = {"Authorization": f"Bearer {KEY}"}
    job_id = requests.post(f"{api_only.base_url}/v1/jobs", json={"prompt": "Hello"},
                           headers={**headers, "Idempotency-Key": "damaged"}, timeout=10).json()["id"]
    store = JobStore.from_url(api_only.redis_url, prefix=Settings().key_prefix)
    store.redis.delete(store.key(job_id))
    store.redis.set(store.key(job_id), "a record of another type")
    answers = [requests.request(method, f"{api_only.base_url}{path}", headers=extra, timeout=10)
               for method, path, extra in (("GET", f"/v1/jobs/{job_id}", headers),
                                           ("GET", f"/v1/jobs/chatcmpl-{job_id}", headers),
                                           ("DELETE", f"/v1/jobs/{job_id}", headers),
                                           ("POST", "/v1/jobs/cancel", {**headers, "Idempotency-Key": "damaged"}))]
    for answer in answers:
        error = answer.json()["error"]
        assert (answer.status_code, error["type"], error["code"]) == (500, "server_error", ErrorCode.SERVER_ERROR)
        assert error["message"].startswith(f"job {job_id}: the job's record is damaged: its key holds a string"), error
    log = (api_only.log_dir / "api.log").read_text()
    assert "is unavailable" not in log and "the job's record is damaged" in log


def test_the_original_controllers_model_list_counts_against_the_keys_reads(api_only):  # noqa: F811
    # The original web server asks /refresh_all_workers, then /list_models, at every page load and refresh: counted
    # with the key's other requests (here 40 a minute), twenty page loads left the key no request for the minute.
    wait_for_a_fresh_minute()
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path: str) -> requests.Response:
        return requests.post(f"{api_only.base_url}{path}", headers=headers, timeout=10)

    page_loads = [post(path).status_code for _ in range(20) for path in ("/refresh_all_workers", "/list_models")]
    assert page_loads == [200] * 40
    assert requests.get(f"{api_only.base_url}/v1/jobs/none", headers=headers, timeout=10).status_code == 404
    over = post("/list_models")
    assert over.status_code == 429 and "counted apart" in over.json()["error"]["message"], over.text
    assert requests.post(f"{api_only.base_url}/list_models", timeout=10).status_code == 401  # the key is still checked
