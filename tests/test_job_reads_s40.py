"""`JobStore.get_many` (a page of `GET /v1/jobs`, and `GET /v1/jobs?ids=` that `llava-queue eval` polls its jobs with,
100 at a time) read the records in one round trip, then each queued job's place in its queue in one more round trip
of its own: 100 round trips for a page of queued jobs, twice a second for a run of 256 jobs in flight. The places
are read together now, in one."""

from test_job_store import counting_store, request, round_trips, redis_url  # noqa: F401 (a fixture)


def test_a_page_of_queued_jobs_is_read_in_two_round_trips(redis_url):  # noqa: F811
    store = counting_store(redis_url)
    interactive = [store.create(request(f"i{index}"), "interactive")[0] for index in range(3)]
    batch = [store.create(request(f"b{index}"), "batch")[0] for index in range(40)]
    asked = batch[::-1] + interactive + ["gone"]
    records: list = []
    assert round_trips(lambda: records.extend(store.get_many(asked))) == 2
    # The same places as a job's own read gives: a batch job behind every interactive one.
    assert [record["queue_position"] for record in records[:-1]] == [
        store.get(job_id)["queue_position"] for job_id in asked[:-1]]
    assert records[0]["queue_position"] == 3 + 39 and records[40]["queue_position"] == 0 and records[-1] is None
    # Started jobs have no place; a page without queued jobs is one round trip.
    for job_id in interactive:
        store.redis.hset(store.key(job_id), "status", "running")
    assert round_trips(lambda: store.get_many(interactive)) == 1
    assert [record["queue_position"] for record in store.get_many(interactive)] == [None] * 3
