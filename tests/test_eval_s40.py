"""Offline evaluation as an evaluation user runs it: a question file of large photos read by `POST /v1/batches`
within bounded API memory, and bad lines reported as the user wrote them (their question_id, their own position),
by `llava-queue eval` and `POST /v1/batches` alike."""

import json
import os

import requests

from conftest import run_stack
from llava_fixtures import png_bytes
from shared.cli import build_parser
from shared.redis_server import RedisServer
from test_batches import download, jsonl, peak_memory_kib, upload_batch, wait_for_batch


def eval_in_process(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_a_question_file_of_large_photos_is_read_in_bounded_memory(tmp_path):
    # A chunk's 500 lines were held with their images until the chunk was written (and then once more, packed for
    # Redis): 150 lines of 2 MB photos took 1.2 GB of the API's memory here, and 500 lines of 20 MB ones
    # (MAX_IMAGE_BYTES) would take 20 GB; the image cache held 64 of them too. Now a chunk ends at 16 MiB of images,
    # and so does the cache (60 MB here).
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "base.png").write_bytes(png_bytes(900, 800, seed=7))  # 2.2 MB of noise: 2.9 MB as base64
    for index in range(150):
        os.link(folder / "base.png", folder / f"photo{index}.png")  # a file of its own: read for its line
    questions = [{"question_id": index, "image": f"photo{index}.png", "text": "What is in the photo?"}
                 for index in range(150)]
    (tmp_path / "photos.jsonl").write_bytes(jsonl(questions))
    env = {"LLAVA_QUEUE_DATA_ROOTS": str(tmp_path)}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-photos-") as stack:
        before = peak_memory_kib(stack.processes["api"].pid)
        response = requests.post(f"{stack.base_url}/v1/batches", timeout=300, json={
            "input_path": "photos.jsonl", "image_folder": "photos", "temperature": 0, "max_new_tokens": 4})
        grown_mib = (peak_memory_kib(stack.processes["api"].pid) - before) / 1024
        assert response.status_code == 200, response.text
        batch = response.json()
        assert batch["status"] == "in_progress" and batch["errors"] is None, batch
        assert batch["request_counts"] == {"total": 150, "completed": 0, "failed": 0}, batch
        lines = requests.get(f"{stack.base_url}/v1/batches/{batch['id']}/lines?limit=1000", timeout=30).json()["data"]
        assert [line["line"] for line in lines] == list(range(1, 151))
        assert all(line["job_id"] and line["status"] == "queued" for line in lines), lines[:3]
        assert grown_mib < 128, grown_mib
        requests.post(f"{stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=60)


BAD_LINES = [
    {"question_id": 0, "text": "Say one word."},
    {"question_id": "q-17", "image_file": "cat.png"},  # no text (a field misnamed)
    {"question_id": 18, "text": ["Say", "two words."]},  # text not a string
    '{"question_id": 19, "text": "Say three words."',  # cut short after a whole value
    {"question_id": 2, "text": "Say four words."},
]


def test_a_bad_question_line_keeps_its_question_id_in_the_errors_file(tiny_llava_stack, tmp_path, capsys):
    # `llava-queue eval` wrote `"question_id": null` for every line that was JSON but no valid question, though the
    # line names its id: the user could not tell which question went unanswered. POST /v1/batches named it already.
    (tmp_path / "q.jsonl").write_bytes(jsonl(BAD_LINES))
    answers = tmp_path / "a.jsonl"
    status = eval_in_process(["eval", "--question-file", str(tmp_path / "q.jsonl"), "--answers-file", str(answers),
                              "--api-url", tiny_llava_stack.base_url, "--temperature", "0", "--max_new_tokens", "2"])
    assert status == 1, capsys.readouterr()
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [0, 2]
    errors = [json.loads(line) for line in (tmp_path / "a.jsonl.errors").read_text().splitlines()]
    assert [(error["line"], error["question_id"]) for error in errors] == [(2, "q-17"), (3, 18), (4, None)], errors
    assert "text: field required" in errors[0]["error"]

    # The same file through POST /v1/batches names the same questions.
    batch = wait_for_batch(tiny_llava_stack, upload_batch(tiny_llava_stack, jsonl(BAD_LINES), temperature=0,
                                                          max_new_tokens=2)["id"])
    assert batch["request_counts"] == {"total": 5, "completed": 2, "failed": 3}, batch
    refused = download(tiny_llava_stack, batch["id"], "errors")
    assert [(error["line"], error["question_id"]) for error in refused] == [(2, "q-17"), (3, 18), (4, None)]


def test_a_line_cut_short_is_said_to_be_so_at_its_own_position(tiny_llava_stack):
    # The line was parsed with its line break: a line cut short after a whole value was "line 4 is not valid JSON:
    # Expecting ',' delimiter: line 2 column 1", a second line of a one-line text.
    batch = upload_batch(tiny_llava_stack, jsonl(BAD_LINES), temperature=0, max_new_tokens=2)
    [cut] = [error for error in batch["errors"]["data"] if error["line"] == 4]
    assert cut["message"] == "line 4 is not valid JSON: Expecting ',' delimiter: line 1 column 47 (char 46)", cut
    requests.post(f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=30)
