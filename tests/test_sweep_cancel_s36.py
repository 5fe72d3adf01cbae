"""A job cancelled while its worker was dead ends cancelled when the orphan sweep claims it. The cancel left it to
its worker (its holder was a worker, not a mark), and the sweep delivered it again, where it waited for a worker of
its model to start it and end it: where none came, for its whole wait again (a batch's line: the batch's window,
the batch `cancelling` for a day)."""

import uuid

from shared.jobs import JobStore
from shared.protocol import GenerateRequest


def test_a_job_cancelled_while_its_worker_was_dead_ends_when_it_is_swept(redis_server):
    from workers.main import _deliver_claimed

    store = JobStore.from_url(redis_server.url, prefix=f"sweep-cancel-{uuid.uuid4().hex[:8]}")
    request = GenerateRequest(prompt="p", model="a-model-no-worker-serves")
    cancelled, other = (store.create(request, "batch")[0] for _ in range(2))
    for job_id in (cancelled, other):
        assert store.start(job_id, "dead-worker") == "running"  # a worker that never beats: dead
    assert store.cancel(cancelled) == "running"
    assert store.get(cancelled)["status"] == "running"  # left to its worker, which is gone
    claims = {claim.job_id: claim for claim in store.orphans(0)}
    assert sorted(claims) == sorted([cancelled, other])
    del claims[other]  # (delivered through the worker's Celery app, which this test has not pointed at its Redis)
    _deliver_claimed(store, claims, 60)
    assert claims == {}
    ended = store.get(cancelled)
    assert ended["status"] == "cancelled" and ended["error_code"] != 0, ended
    assert store.get(other)["status"] == "running"
