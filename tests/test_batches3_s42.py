"""A batch that became final while its reader went on takes no more lines; the batch and file routes answer a bad
request 400, as OpenAI does; a batch file of a batch unknown to the caller is an unknown file."""

import openai
import pytest
from openai import OpenAI

from api.routes.batches import BatchCreate, batch_view, create, output_lines
from conftest import run_stack
from shared.batches import BatchStore
from shared.jobs import JobStore, WorkerRegistry
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_batches import jsonl, questions
from test_batches2_s42 import ReadSlowly, lapse_reader


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_chunk_read_after_its_batch_failed_as_abandoned_is_not_added_to_it(cancelled):
    # The chunk its slow reader was writing when the batch failed (or, cancelled before, ended `cancelled`) was added to
    # it all the same, and its jobs cancelled (their results written into the batch): the final batch's total, failed
    # count and errors file grew, and its `errors` listed a line of that chunk its errors file did not hold.
    class ReadAbandoned(ReadSlowly):
        """Overtaken by a cancel if `cancelled`, then by a read of the batch that finds its reader's lease lapsed."""

        failed = None

        def overtake(self) -> None:
            [batch_id] = batches.redis.zrange(batches.index_key, 0, -1)
            if cancelled:
                assert batches.request_cancel(batch_id) == "cancelling"
                batches.cancel_jobs(batch_id)
            record = lapse_reader(batches, batch_id)
            self.failed = batch_view(batches, record), list(output_lines(batches, record, errors=True))

    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        lines = questions(1000, image=False)
        lines[700] = "{not json"  # in the chunk read after the batch failed
        stream = ReadAbandoned(jsonl(lines))
        batch = create(BatchCreate(temperature=0, max_new_tokens=2), stream, store, batches, None,
                       WorkerRegistry(store.redis, store.prefix), Settings(redis_url=server.url), None)
        view, errors = stream.failed
        status = "cancelled" if cancelled else "failed"
        assert view["status"] == status and view["request_counts"] == {"total": 500, "completed": 0, "failed": 500}
        assert len(errors) == 500
        assert batch["status"] == status and batch["request_counts"] == view["request_counts"], batch
        assert [error["code"] for error in batch["errors"]["data"]] == ["abandoned"], batch["errors"]
        assert list(output_lines(batches, batches.get(batch["id"]), errors=True)) == errors
        # The chunk's jobs are cancelled, none left queued.
        assert store.redis.zcard(store.queue_key("batch")) == 0


@pytest.fixture(scope="module")
def client():
    """The openai package's client of an API with no worker."""
    with RedisServer() as server, run_stack(server.url, {}, workers=(),
                                            log_prefix="llava-queue-batches3-s42-") as stack:
        yield OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("call, param", [
    (lambda client: client.batches.create(input_file_id="file-none", endpoint="/v1/chat/completions",
                                          completion_window="24h", metadata={str(key): "v" for key in range(17)}),
     "metadata"),
    (lambda client: client.batches.create(input_file_id="file-none", endpoint="/v1/chat/completions",
                                          completion_window="1000d"), "completion_window"),
    (lambda client: client.batches.list(limit=1000), "query.limit"),
    (lambda client: client.files.list(order="sideways"), "query.order"),
])
def test_a_bad_batch_or_file_request_is_a_400_as_on_openai(client, call, param):
    # They were 422s: the openai package raised UnprocessableEntityError where OpenAI's API raises BadRequestError.
    with pytest.raises(openai.BadRequestError) as refused:
        call(client)
    assert refused.value.body["param"] == param, refused.value.body


def test_a_batch_file_of_an_unknown_batch_is_an_unknown_file(client):
    # It said "unknown batch id" with param batch_id, for a file id (its batch expired, or is another key's).
    file_id = f"file-batch_{'0' * 32}-output"
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as unknown:
            call(file_id)
        assert unknown.value.body["param"] == "file_id", unknown.value.body
        assert unknown.value.body["message"].startswith(f"unknown file id {file_id!r}"), unknown.value.body
