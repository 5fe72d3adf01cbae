"""Review of session 43's batch, routing and cancel changes: a batch's files are listed in the order of their
created_at (when the batch ended)."""

from test_batches_s43 import openai_client, refused_batch  # noqa: F401 (a fixture)


def test_batch_files_are_listed_by_when_they_were_made(openai_client):  # noqa: F811
    # A batch's file is made when the batch ends (its created_at), but the list put it where its batch was created:
    # newest first, a batch that ended late came after one created later that ended early, out of created_at order
    # (a client that stops paging at the first file older than it wants missed it).
    client, store = openai_client
    first, second = refused_batch(client), refused_batch(client)
    store.redis.hset(f"{store.batch_prefix}{first.id}", "failed_at", repr(second.failed_at + 100.0))
    listed = [(file.created_at, file.id) for file in client.files.list(purpose="batch_output")]
    assert [file_id for _, file_id in listed] == [first.error_file_id, second.error_file_id], listed
    assert listed == sorted(listed, reverse=True), listed
    ascending = [file.id for file in client.files.list(purpose="batch_output", order="asc")]
    assert ascending == [second.error_file_id, first.error_file_id], ascending
    # Paged from a file, the next page is the files made before it.
    after = client.files.list(purpose="batch_output", after=first.error_file_id)
    assert [file.id for file in after.data] == [second.error_file_id], after

