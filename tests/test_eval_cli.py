"""`llava-queue eval`: an original question file answered through the real stack (a tiny LLaVA), as a user runs it.

The answers file must be what `model_vqa.py` writes (its keys, in order, one line per question,
in question-file order), greedy answers must be those of single interactive jobs, a bad line
must fail alone, and a run stopped half-way must be finished by running it again, with no
question asked twice.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests

from api.auth import key_digest, rate_counter
from conftest import run_stack
from llava_fixtures import b64, png_bytes, png_claiming_size
from shared.cli import build_parser
from shared.redis_server import RedisServer, free_port
from shared.settings import Settings
from shared.vqa import EvalParams, Question, get_chunk, question_job, question_prompt

ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
MODEL = "llava-v1.5-tiny"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """50 PNGs of different sizes and pixels, as a benchmark's image folder holds them."""
    folder = tmp_path_factory.mktemp("eval-images")
    for index in range(50):
        (folder / f"img_{index}.png").write_bytes(png_bytes(24 + index % 37, 20 + index % 23, seed=100 + index))
    return folder


def write_questions(path: Path, question_ids, marker: str = "") -> list[dict]:
    """An original question file: question i asks about img_i.png."""
    questions = [{"question_id": qid, "image": f"img_{index}.png",
                  "text": f"What is in picture {index}?{marker}", "category": "conv"}
                 for index, qid in enumerate(question_ids)]
    path.write_text("".join(json.dumps(question) + "\n" for question in questions))
    return questions


def eval_args(stack, questions: Path, images: Path, answers: Path, *extra: str) -> list[str]:
    return ["eval", "--question-file", str(questions), "--image-folder", str(images), "--answers-file",
            str(answers), "--api-url", stack.base_url, "--temperature", "0", "--max_new_tokens", "8", *extra]


def eval_in_process(argv: list[str]) -> int:
    """`llava-queue eval ...` in this process (what `main` does, without redoing the logging setup)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def interactive_answer(stack, text: str, image: bytes) -> str:
    """The same question as one interactive job, the way a user would ask it."""
    job = {"prompt": question_prompt(text, "llava_v1"), "images": [b64(image)], "temperature": 0,
           "max_new_tokens": 8}
    job_id = requests.post(f"{stack.base_url}/v1/jobs", json=job, timeout=10).json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
        if record["status"] == "succeeded":
            return record["text"].strip()
        assert record["status"] in ("queued", "running"), record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end\n{stack.logs()}")


def test_a_question_file_becomes_the_originals_answers_file(tiny_llava_stack, images, tmp_path):
    # Ids out of order, and of both kinds: the file's order is the answers' order, ids are echoed as given.
    question_ids = [f"q{n}" if n % 5 == 0 else n for n in range(1000, 950, -1)]
    questions = write_questions(tmp_path / "questions.jsonl", question_ids)
    answers = tmp_path / "answers" / "model.jsonl"
    done = subprocess.run([sys.executable, "-m", "shared.cli",
                           *eval_args(tiny_llava_stack, tmp_path / "questions.jsonl", images, answers,
                                      "--model", MODEL)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "eval 50/50" in done.stderr and "failed 0" in done.stderr and "tok/s" in done.stderr
    assert "50 answered (0 before this run), 0 failed; this run: 50 jobs submitted" in done.stdout

    lines = read_lines(answers)
    assert [line["question_id"] for line in lines] == question_ids
    for line, question in zip(lines, questions):
        assert list(line) == ANSWER_KEYS
        assert line["prompt"] == question["text"] and line["model_id"] == MODEL and line["metadata"] == {}
        assert line["text"] == line["text"].strip()
    assert len({line["answer_id"] for line in lines}) == 50 and all(len(line["answer_id"]) == 22 for line in lines)
    # Nothing is left beside the answers when everything was answered, but the parameters they were made with.
    assert sorted(path.name for path in answers.parent.iterdir()) == ["model.jsonl", "model.jsonl.params"]

    for index in (0, 17, 49):
        image = (images / f"img_{index}.png").read_bytes()
        assert lines[index]["text"] == interactive_answer(tiny_llava_stack, questions[index]["text"], image)


def test_bad_lines_fail_alone_with_their_reason(tiny_llava_stack, images, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("Dear reviewer, this is not a picture.\n")
    (tmp_path / "cat.png").write_bytes(png_bytes(40, 30, seed=1))
    good = [{"question_id": n, "image": "cat.png", "text": f"Question {n}?"} for n in (1, 2, 3)]
    lines = [
        json.dumps(good[0]),
        '{"question_id": 10, "image": "cat.png", "text": "cut',
        json.dumps({"question_id": 11, "image": "missing.png", "text": "Where is it?"}),
        "",
        json.dumps(good[1]),
        json.dumps({"question_id": 12, "image": "notes.png", "text": "And this?"}),
        json.dumps({"question_id": 13, "image": "cat.png"}),
        json.dumps({"question_id": 2, "image": "cat.png", "text": "Question 2 again?"}),
        # A second <image> in the text: only the worker sees the prompt has two for one image.
        json.dumps({"question_id": 14, "image": "cat.png", "text": "Compare with <image>"}),
        json.dumps(good[2]),
    ]
    (tmp_path / "questions.jsonl").write_text("\n".join(lines) + "\n")
    answers = tmp_path / "answers.jsonl"

    status = eval_in_process(eval_args(tiny_llava_stack, tmp_path / "questions.jsonl", tmp_path, answers))
    assert status == 1
    # Another question under a question_id already used is a question of its own, as the original answers it.
    assert [(line["question_id"], line["prompt"]) for line in read_lines(answers)] == \
        [(1, "Question 1?"), (2, "Question 2?"), (2, "Question 2 again?"), (3, "Question 3?")]
    errors = {error["line"]: error for error in read_lines(tmp_path / "answers.jsonl.errors")}
    assert sorted(errors) == [2, 3, 6, 7, 9]
    assert errors[2]["question_id"] is None and "malformed JSON" in errors[2]["error"]
    assert errors[3]["question_id"] == 11 and "cannot read image 'missing.png'" in errors[3]["error"]
    assert "No such file" in errors[3]["error"]
    assert errors[6]["question_id"] == 12 and "image 'notes.png' is not an image file" in errors[6]["error"]
    assert errors[7]["question_id"] == 13 and "text: field required" in errors[7]["error"]
    assert errors[9]["question_id"] == 14 and "Number of images does not match" in errors[9]["error"]
    assert errors[9]["job_id"]
    out = capsys.readouterr().out
    assert "4 answered (0 before this run), 5 failed (see " in out


def test_a_question_only_the_api_refuses_fails_alone(tiny_llava_stack, tmp_path):
    # This client allows more pixels than the API does: the API refuses one job of the group (422), and the
    # others must still be answered.
    (tmp_path / "cat.png").write_bytes(png_bytes(40, 30, seed=1))
    (tmp_path / "huge.png").write_bytes(png_claiming_size(10_000, 8_000))
    lines = [{"question_id": n, "image": "huge.png" if n == 2 else "cat.png", "text": f"Question {n}?"}
             for n in (1, 2, 3)]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = tmp_path / "answers.jsonl"
    done = subprocess.run([sys.executable, "-m", "shared.cli",
                           *eval_args(tiny_llava_stack, tmp_path / "questions.jsonl", tmp_path, answers)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LLAVA_QUEUE_MAX_IMAGE_PIXELS": str(10**9)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert [line["question_id"] for line in read_lines(answers)] == [1, 3]
    [error] = read_lines(tmp_path / "answers.jsonl.errors")
    assert error["question_id"] == 2 and error["line"] == 2
    assert "refused by the API" in error["error"] and "is too large: 10000x8000" in error["error"]


def job_records_with(stack, marker: str) -> int:
    """How many jobs the queue has ever been given whose prompt holds `marker`."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    return sum(marker in (client.hget(key, "prompt") or "") for key in client.scan_iter("llq:job:*", count=1000))


def run_until_interrupted(stack, question_file, images, answers, answered: int) -> tuple[list[str], str]:
    """Run an eval of `question_file` (4 jobs in flight, 32 new tokens) and Ctrl-C it once `answered` answers are
    written (or after 60 s); it must exit 130. Returns its arguments, to run it again, and what it printed on stderr."""
    argv = eval_args(stack, question_file, images, answers, "--max-in-flight", "4")
    argv[argv.index("--max_new_tokens") + 1] = "32"
    first = subprocess.Popen([sys.executable, "-m", "shared.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not answers.exists() or len(answers.read_text().splitlines()) < answered):
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = first.communicate(timeout=30)
    assert first.returncode == 130, out + err
    return argv, err


def test_an_interrupted_run_is_finished_by_running_it_again(tiny_llava_stack, images, tmp_path):
    marker = f" [{uuid.uuid4().hex[:8]}]"
    questions = write_questions(tmp_path / "questions.jsonl", list(range(40)), marker)
    answers = tmp_path / "answers.jsonl"
    argv, err = run_until_interrupted(tiny_llava_stack, tmp_path / "questions.jsonl", images, answers, answered=8)
    assert "interrupted" in err and "Run the same command again" in err
    answered_first = [line["question_id"] for line in read_lines(answers)]
    assert 8 <= len(answered_first) < 40
    # A crash in the middle of writing a line leaves half of it: the next run drops it.
    with open(answers, "a") as file:
        file.write('{"question_id": 39, "prompt": "What is in pict')

    second = subprocess.run([sys.executable, "-m", "shared.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "dropped an unfinished last line" in second.stderr
    lines = read_lines(answers)
    assert [line["question_id"] for line in lines] == list(range(40))
    assert [line["prompt"] for line in lines] == [question["text"] for question in questions]
    summary = second.stdout
    assert f"40 answered ({len(answered_first)} before this run)" in summary
    submitted = int(re.search(r"(\d+) jobs? submitted", summary).group(1))
    collected = int(summary.split(" collected from an earlier run")[0].rsplit(" ", 1)[1])
    # The jobs still in the queue at Ctrl-C were collected, not asked again: one job per question in all.
    assert submitted + collected == 40 - len(answered_first)
    assert job_records_with(tiny_llava_stack, marker) == 40
    assert not (tmp_path / "answers.jsonl.jobs").exists()

    # A third run has nothing to do.
    third = subprocess.run([sys.executable, "-m", "shared.cli", *argv], capture_output=True, text=True, timeout=60)
    assert third.returncode == 0 and "40 answered (40 before this run)" in third.stdout
    assert "0 jobs submitted" in third.stdout and job_records_with(tiny_llava_stack, marker) == 40


def test_a_group_posted_just_before_a_crash_is_not_posted_twice(tiny_llava_stack, images, tmp_path):
    marker = f" [{uuid.uuid4().hex[:8]}]"
    question_file = tmp_path / "questions.jsonl"
    questions = write_questions(question_file, list(range(6)), marker)
    # The crash: a run wrote down the group it was posting (its key and questions, as it does before
    # every post), the API took the post, and the run died before it could write down the job ids.
    key = uuid.uuid4().hex
    params = EvalParams(temperature=0, max_new_tokens=8)
    jobs = [question_job(Question(**question), params, b64((images / question["image"]).read_bytes()))
            for question in questions[:3]]
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/jobs/bulk", headers={"Idempotency-Key": key},
                             json={"jobs": [job.model_dump(mode="json", exclude_none=True) for job in jobs]},
                             timeout=30)
    assert response.status_code == 202, response.text
    run = {**params.model_dump(), "question_file": str(question_file.resolve()), "image_folder": str(images)}
    (tmp_path / "answers.jsonl.jobs").write_text(json.dumps({"key": key, "params": run,
                                                             "question_ids": [0, 1, 2]}) + "\n")

    answers = tmp_path / "answers.jsonl"
    assert eval_in_process(eval_args(tiny_llava_stack, question_file, images, answers)) == 0
    assert [line["question_id"] for line in read_lines(answers)] == list(range(6))
    assert job_records_with(tiny_llava_stack, marker) == 6


def test_chunks_are_the_originals_and_the_model_is_checked(tiny_llava_stack, images, tmp_path, capsys):
    questions = write_questions(tmp_path / "questions.jsonl", list(range(10)))
    answers = tmp_path / "answers_3_1.jsonl"
    base = eval_args(tiny_llava_stack, tmp_path / "questions.jsonl", images, answers)
    # The original's flags: --model-path names the model (its last part), --model-base is the worker's business.
    status = eval_in_process([*base, "--num-chunks", "3", "--chunk-idx", "1", "--model-path",
                              f"/checkpoints/{MODEL}", "--model-base", "/checkpoints/vicuna", "--top_p", "0.9",
                              "--num_beams", "1"])
    assert status == 0
    lines = read_lines(answers)
    assert [line["question_id"] for line in lines] == [q["question_id"] for q in get_chunk(questions, 3, 1)]
    assert [line["question_id"] for line in lines] == [4, 5, 6, 7]
    assert all(line["model_id"] == MODEL for line in lines)
    capsys.readouterr()

    assert eval_in_process([*base, "--num-chunks", "3", "--chunk-idx", "3"]) == 2
    assert "chunk_idx must be in 0..2" in capsys.readouterr().err
    assert eval_in_process([*base, "--model", "llava-v1.5-13b"]) == 2
    assert f"model 'llava-v1.5-13b' is not served at {tiny_llava_stack.base_url} (served: {MODEL})" in \
        capsys.readouterr().err


def interrupted_at_its_first_wait(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the eval CLI until it prints that it waits to retry (its progress line), then Ctrl-C it; its exit code and
    everything it printed on stderr."""
    run = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    # A run that never waits would hold the test (and CI) for ever: killed after two minutes, its output then fails it.
    watchdog = threading.Timer(120, run.kill)
    watchdog.start()
    try:
        for line in run.stderr:
            seen.append(line)
            if "retrying in" in line:
                break
    finally:
        watchdog.cancel()
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=30)
    return run.returncode, "".join(seen) + err


def test_a_full_queue_is_waited_out_and_the_key_is_sent(images, tmp_path):
    """An API with keys and room for 2 queued jobs, and no worker: the jobs stay queued."""
    key = "eval-key-1"
    env = {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(key)]), "LLAVA_QUEUE_MAX_QUEUED_JOBS": "2"}
    write_questions(tmp_path / "questions.jsonl", list(range(6)))
    answers = tmp_path / "answers.jsonl"
    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-eval-full-") as stack:
        argv = [sys.executable, "-m", "shared.cli",
                *eval_args(stack, tmp_path / "questions.jsonl", images, answers, "--max-in-flight", "4")]
        no_key = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert no_key.returncode == 2 and "wants an API key: give --api-key or LLAVA_QUEUE_API_KEY" in no_key.stderr

        returncode, text = interrupted_at_its_first_wait(argv, {**os.environ, "LLAVA_QUEUE_API_KEY": key})
        assert returncode == 130, text
        assert "no worker serves a model" in text
        assert "the queue is full (2 jobs queued, limit 2)" in text
        assert "0 of 6 answered" in text and "2 jobs still in the queue and 2 being posted" in text
        # Two jobs were taken, the next two were refused and are waiting to be posted again with the same key.
        state = read_lines(tmp_path / "answers.jsonl.jobs")
        assert [record["question_ids"] for record in state] == [[0, 1], [2, 3]]
        assert len(state[0]["job_ids"]) == 2 and "job_ids" not in state[1]


def test_a_group_larger_than_the_queue_limit_is_posted_one_by_one(images, tmp_path):
    """Room for 2 queued jobs, groups of 4 (--max-in-flight 8), no worker: the bulk can never fit (400), so the
    group's jobs go one by one, the first two taken and the third waiting for room, instead of the run failing."""
    env = {"LLAVA_QUEUE_MAX_QUEUED_JOBS": "2"}
    write_questions(tmp_path / "questions.jsonl", list(range(6)))
    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-eval-split-") as stack:
        argv = [sys.executable, "-m", "shared.cli", *eval_args(stack, tmp_path / "questions.jsonl", images,
                                                               tmp_path / "answers.jsonl", "--max-in-flight", "8")]
        returncode, text = interrupted_at_its_first_wait(argv)
        assert returncode == 130, text
        assert "the queue is full (2 jobs queued, limit 2)" in text and "split it" not in text, text
        queued = requests.get(f"{stack.base_url}/metrics", timeout=10).text
        assert 'llava_queue_jobs{state="queued"} 2.0' in queued, queued


def test_beam_search_and_an_unreachable_api_are_refused_clearly(tmp_path, capsys):
    write_questions(tmp_path / "questions.jsonl", [1])
    argv = ["eval", "--question-file", str(tmp_path / "questions.jsonl"), "--image-folder", str(tmp_path),
            "--answers-file", str(tmp_path / "answers.jsonl"), "--api-url", f"http://127.0.0.1:{free_port()}"]
    assert eval_in_process([*argv, "--num_beams", "4"]) == 2
    assert "num_beams=4 is not supported" in capsys.readouterr().err
    assert eval_in_process(argv) == 2
    err = capsys.readouterr().err
    assert "cannot reach llava-queue at http://127.0.0.1:" in err and "Connection refused" in err
    assert not (tmp_path / "answers.jsonl").exists()


def test_a_question_too_long_for_a_job_fails_alone(tiny_llava_stack, tmp_path):
    # Within the question's own limit, but the template around it makes the prompt longer than a job may be.
    from shared.protocol import MAX_PROMPT_CHARS

    (tmp_path / "cat.png").write_bytes(png_bytes(40, 30, seed=1))
    lines = [{"question_id": 1, "image": "cat.png", "text": "Question 1?"},
             {"question_id": 2, "image": "cat.png", "text": "x" * MAX_PROMPT_CHARS},
             {"question_id": 3, "image": "cat.png", "text": "Question 3?"}]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = tmp_path / "answers.jsonl"
    assert eval_in_process(eval_args(tiny_llava_stack, tmp_path / "questions.jsonl", tmp_path, answers)) == 1
    assert [line["question_id"] for line in read_lines(answers)] == [1, 3]
    [error] = read_lines(tmp_path / "answers.jsonl.errors")
    assert error["question_id"] == 2 and error["line"] == 2 and "characters long" in error["error"]


def stop_redis_when(redis_server: RedisServer, ready, give_up_after: float = 90.0):
    """In a thread: stop `redis_server` once `ready()` is true (the API then answers 503 to everything); if the
    run in this (main) thread has not ended `give_up_after` seconds later, Ctrl-C it. Clear the returned event
    when the run has ended."""
    import threading

    def watch():
        deadline = time.monotonic() + give_up_after
        while not ready():
            if not watching.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.01)
        redis_server.stop()
        while time.monotonic() < deadline:
            if not watching.is_set():
                return
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    watching = threading.Event()
    watching.set()
    threading.Thread(target=watch, daemon=True).start()
    return watching


@pytest.mark.parametrize("where", ["polling", "posting"])
def test_a_job_store_that_stays_away_stops_the_run(images, tmp_path, monkeypatch, capsys, where):
    """Redis goes away for good: the API answers 503 to every poll (or to the post a full queue had put off);
    the run must stop after its patience, with status 2, not retry forever."""
    import shared.eval_cli

    monkeypatch.setattr(shared.eval_cli, "PATIENCE_SECONDS", 3.0)
    write_questions(tmp_path / "questions.jsonl", list(range(6)))
    answers = tmp_path / "answers.jsonl"
    state = tmp_path / "answers.jsonl.jobs"
    env = {"LLAVA_QUEUE_MAX_QUEUED_JOBS": "2"} if where == "posting" else {}

    def ready() -> bool:
        try:
            records = read_lines(state) if state.exists() else []
        except ValueError:  # a line being written
            return False
        if where == "polling":  # the first jobs are in the queue
            return any(record.get("job_ids") for record in records)
        return len(records) >= 3  # a group in the queue, the next being posted (refused: the queue is full)

    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-eval-lost-") as stack:
        watching = stop_redis_when(redis_server, ready)
        started = time.monotonic()
        try:
            status = eval_in_process(eval_args(stack, tmp_path / "questions.jsonl", images, answers,
                                               "--max-in-flight", "2" if where == "polling" else "4"))
        finally:
            watching.clear()
        err = capsys.readouterr().err
    assert status == 2, err
    # Polling went on while the full queue put the post off (its Retry-After, 30 s with no worker, used to hold
    # the run up before it could see Redis gone).
    assert "stopped:" in err and "unavailable" in err and time.monotonic() - started < 20, err
    # What was in the queue is kept for the next run.
    assert read_lines(state)


def test_an_answers_file_that_cannot_be_written_is_refused(tiny_llava_stack, images, tmp_path, capsys):
    # A typo: the answers "folder" is a file. The run cannot start: status 2 and why, not a traceback (nor 1,
    # "some questions failed").
    write_questions(tmp_path / "questions.jsonl", [1, 2])
    (tmp_path / "answers").write_text("not a folder\n")
    for answers, extra in ((tmp_path / "answers" / "a.jsonl", ()),
                           (tmp_path / "a.jsonl", ("--errors-file", str(tmp_path / "answers" / "a.errors")))):
        status = eval_in_process(eval_args(tiny_llava_stack, tmp_path / "questions.jsonl", images, answers, *extra))
        err = capsys.readouterr().err
        assert status == 2, err
        assert "llava-queue eval: " in err and str(tmp_path / "answers") in err


def test_a_category_of_any_kind_is_ignored_as_the_original_ignores_it(tiny_llava_stack, tmp_path):
    # model_vqa.py never reads `category`: a question file whose categories are numbers or lists is answered.
    (tmp_path / "cat.png").write_bytes(png_bytes(40, 30, seed=1))
    lines = [{"question_id": 1, "image": "cat.png", "text": "Question 1?", "category": 3},
             {"question_id": 2, "image": "cat.png", "text": "Question 2?", "category": ["conv", "detail"]},
             {"question_id": 3, "image": "cat.png", "text": "Question 3?", "category": "conv"}]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = tmp_path / "answers.jsonl"
    assert eval_in_process(eval_args(tiny_llava_stack, tmp_path / "questions.jsonl", tmp_path, answers)) == 0
    assert [line["question_id"] for line in read_lines(answers)] == [1, 2, 3]


def test_answers_of_another_question_file_or_model_are_not_taken_as_done(tiny_llava_stack, images, tmp_path, capsys):
    # Resuming skips the questions already answered; an answers file left by another question file with the same
    # ids (benchmarks number their questions from 0), or by another model, was taken as this run's answers.
    answers = tmp_path / "answers.jsonl"
    write_questions(tmp_path / "first.jsonl", [0, 1, 2], " (first benchmark)")
    assert eval_in_process(eval_args(tiny_llava_stack, tmp_path / "first.jsonl", images, answers)) == 0
    second = write_questions(tmp_path / "second.jsonl", [0, 1, 2], " (second benchmark)")
    capsys.readouterr()
    assert eval_in_process(eval_args(tiny_llava_stack, tmp_path / "second.jsonl", images, answers)) == 0
    captured = capsys.readouterr()
    assert "3 answered (0 before this run)" in captured.out, captured.out + captured.err
    assert "3 answers in" in captured.err and "asked again" in captured.err
    assert [line["prompt"] for line in read_lines(answers)] == [question["text"] for question in second]
    # The same questions for a model named on the command line: an answer by another model is not its answer, and
    # stops the run (it was asked again, and that model's answer thrown away: see test_eval_s42).
    with open(answers, "r+") as file:
        lines = read_lines(answers)
        lines[1]["model_id"] = "llava-v1.5-13b"
        file.write("".join(json.dumps(line) + "\n" for line in lines))
    written = answers.read_text()
    capsys.readouterr()
    assert eval_in_process(eval_args(tiny_llava_stack, tmp_path / "second.jsonl", images, answers,
                                     "--model", MODEL)) == 2
    assert "were made by model 'llava-v1.5-13b'" in capsys.readouterr().err
    assert answers.read_text() == written


def test_a_question_file_that_starts_with_a_byte_order_mark_is_read_whole(tmp_path):
    # Editors on Windows start a UTF-8 file with a BOM: POST /v1/batches reads such a file (json.loads skips it),
    # the CLI failed its first question as "malformed JSON".
    from shared.eval_cli import read_questions

    path = tmp_path / "questions.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"question_id": n, "text": "Why?"}).encode() + b"\n"
                                                for n in (1, 2)))
    items = read_questions(path)
    assert [(item.line, item.error, item.question.question_id) for item in items] == [(1, None, 1), (2, None, 2)]


def test_a_home_relative_path_is_read_as_model_vqa_reads_it(tmp_path, monkeypatch, capsys):
    # model_vqa.py expands "~" in --question-file and --answers-file (a quoted path in a script keeps it); the CLI
    # refused such a question file as unreadable.
    monkeypatch.setenv("HOME", str(tmp_path))
    write_questions(tmp_path / "questions.jsonl", [1])
    argv = ["eval", "--question-file", "~/questions.jsonl", "--image-folder", str(tmp_path),
            "--answers-file", "~/answers/a.jsonl", "--api-url", f"http://127.0.0.1:{free_port()}"]
    assert eval_in_process(argv) == 2
    err = capsys.readouterr().err
    assert "cannot reach llava-queue" in err and "cannot read the question file" not in err, err


def test_questions_that_share_a_question_id_are_each_answered(tiny_llava_stack, images, tmp_path, capsys):
    # MME's question file (llava_mme.jsonl, which the original's mme.sh runs) asks two questions of every image, both
    # under the image's path as question_id, and its scorer matches answers by question_id and prompt: the original
    # answers every line. The CLI answered the first of each pair and failed the second as a repeat.
    questions = [{"question_id": f"count/{n}.png", "image": f"img_{n}.png",
                  "text": f"Are there {k} objects?\nAnswer the question using a single word or phrase.",
                  "category": "count"} for n in (0, 1) for k in (2, 3)]
    questions.append(questions[0])  # a line repeated as it is: the original answers it twice too
    question_file = tmp_path / "llava_mme.jsonl"
    question_file.write_text("".join(json.dumps(question) + "\n" for question in questions))
    answers = tmp_path / "answers.jsonl"
    argv = eval_args(tiny_llava_stack, question_file, images, answers)
    assert eval_in_process(argv) == 0
    asked = [(question["question_id"], question["text"]) for question in questions]
    assert [(line["question_id"], line["prompt"]) for line in read_lines(answers)] == asked
    assert not (tmp_path / "answers.jsonl.errors").exists()

    # Resuming matches answers by question_id and question: the one answer lost is the one asked again.
    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text("".join(lines[:2] + lines[3:]))
    capsys.readouterr()
    assert eval_in_process(argv) == 0
    assert "5 answered (4 before this run), 0 failed; this run: 1 job submitted" in capsys.readouterr().out
    again = answers.read_text().splitlines(keepends=True)
    assert [(line["question_id"], line["prompt"]) for line in read_lines(answers)] == asked
    assert again[:2] + again[3:] == lines[:2] + lines[3:]


def test_an_interrupted_run_of_questions_that_share_ids_asks_each_once(tiny_llava_stack, images, tmp_path):
    # Two questions per question_id, as MME's: the jobs left in the queue at Ctrl-C are collected for their own
    # questions, and the rest asked, each question once.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    questions = [{"question_id": f"img_{n // 2}.png", "image": f"img_{n // 2}.png",
                  "text": f"Is there a {('cat', 'dog')[n % 2]}?{marker}"} for n in range(16)]
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text("".join(json.dumps(question) + "\n" for question in questions))
    answers = tmp_path / "answers.jsonl"
    argv, _ = run_until_interrupted(tiny_llava_stack, question_file, images, answers, answered=4)

    second = subprocess.run([sys.executable, "-m", "shared.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [(line["question_id"], line["prompt"]) for line in read_lines(answers)] == \
        [(question["question_id"], question["text"]) for question in questions]
    assert job_records_with(tiny_llava_stack, marker) == 16
    assert not (tmp_path / "answers.jsonl.jobs").exists()


def test_a_group_over_the_apis_body_limit_is_posted_one_by_one(tiny_llava_dir, tmp_path):
    """An API that takes smaller bodies than a group (MAX_BODY_BYTES, or a proxy's limit in front of it) answers the
    bulk post 413: the group's jobs go one by one, and only the question whose job alone is too large fails."""
    (tmp_path / "cat.png").write_bytes(png_bytes(40, 30, seed=1))
    (tmp_path / "big.png").write_bytes(png_bytes(80, 80, seed=2))
    lines = [{"question_id": n, "image": "big.png" if n == 2 else "cat.png", "text": f"Question {n}?"}
             for n in (1, 2, 3)]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = tmp_path / "answers.jsonl"
    env = {"LLAVA_QUEUE_MODEL_PATH": str(tiny_llava_dir), "LLAVA_QUEUE_DEVICE": "cpu",
           "LLAVA_QUEUE_DTYPE": "float32", "LLAVA_QUEUE_MAX_BODY_BYTES": "12000"}
    # As the tiny LLaVA stack: its tower is local, no setting of the caller's may point elsewhere.
    for name in ("LLAVA_QUEUE_MODEL_BASE", "LLAVA_QUEUE_MODEL_NAME", "LLAVA_QUEUE_VISION_TOWER"):
        os.environ.pop(name, None)
    with RedisServer() as redis_server, run_stack(redis_server.url, env, log_prefix="llava-queue-eval-413-") as stack:
        done = subprocess.run([sys.executable, "-m", "shared.cli",
                               *eval_args(stack, tmp_path / "questions.jsonl", tmp_path, answers)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert [line["question_id"] for line in read_lines(answers)] == [1, 3]
    [error] = read_lines(tmp_path / "answers.jsonl.errors")
    assert error["question_id"] == 2 and "refused by the API: the request body is larger than 12000 bytes" in \
        error["error"]


def test_a_rate_limit_met_at_the_start_is_waited_out(images, tmp_path):
    """A key's requests per minute used up (by a run just stopped, say): the first call, GET /v1/models, gets a 429.
    The run must wait it out as it waits out every other 429, not stop with status 2 as if the API were not
    llava-queue."""
    key = "eval-key-2"
    env = {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(key)]), "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE": "1"}
    write_questions(tmp_path / "questions.jsonl", list(range(2)))
    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-eval-rate-") as stack:
        # The limit counts per clock minute: this one's is used up by a call, the next two's here (the run's own
        # start takes seconds on a loaded machine, and may cross into the next minute).
        for _ in range(2):
            requests.get(f"{stack.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        admin = redis.Redis.from_url(redis_server.url)
        for minute in (1, 2):
            for reads in (False, True):  # the model list's reads are counted apart
                admin.set(rate_counter(Settings().key_prefix, key_digest(key), time.time() + 60 * minute, reads), 1,
                          ex=300)
        argv = [sys.executable, "-m", "shared.cli",
                *eval_args(stack, tmp_path / "questions.jsonl", images, tmp_path / "answers.jsonl")]
        returncode, text = interrupted_at_its_first_wait(argv, {**os.environ, "LLAVA_QUEUE_API_KEY": key})
    assert returncode == 130, text
    assert "rate limit of 1 requests per minute reached" in text and "retrying in" in text
    assert "does not look like llava-queue" not in text


def test_a_job_store_away_at_the_start_is_waited_for(images, tmp_path, monkeypatch, capsys):
    """Redis away when the run starts: the API answers 503, which the run waits out (for its patience) as it does
    later, and then stops with why, not with "does not look like llava-queue" at once."""
    import shared.eval_cli

    monkeypatch.setattr(shared.eval_cli, "PATIENCE_SECONDS", 3.0)
    write_questions(tmp_path / "questions.jsonl", list(range(2)))
    with RedisServer() as redis_server, run_stack(redis_server.url, {}, workers=(),
                                                   log_prefix="llava-queue-eval-away-") as stack:
        redis_server.stop()
        started = time.monotonic()
        status = eval_in_process(eval_args(stack, tmp_path / "questions.jsonl", images, tmp_path / "answers.jsonl"))
        waited = time.monotonic() - started
    err = capsys.readouterr().err
    assert status == 2 and waited >= 3.0, err
    assert "GET /v1/models answered 503" in err and "retrying in" in err and "answered 503 for 3 s" in err
    assert "does not look like llava-queue" not in err


def test_an_answers_or_errors_file_that_is_no_regular_file_is_refused_at_once(tmp_path, capsys):
    # It is read back to go on after a stop: /dev/full read for ever (17 GB of "answers" before the kernel killed
    # the run), a pipe hung. /dev/null reads as empty, and is taken. Refused before any question is sent.
    write_questions(tmp_path / "questions.jsonl", [1])
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    base = ["eval", "--question-file", str(tmp_path / "questions.jsonl"), "--image-folder", str(tmp_path),
            "--api-url", "http://127.0.0.1:1"]
    for what, flags in [("answers", ["--answers-file", "/dev/full"]), ("answers", ["--answers-file", str(pipe)]),
                        ("errors", ["--answers-file", str(tmp_path / "a.jsonl"), "--errors-file", str(pipe)])]:
        assert eval_in_process([*base, *flags]) == 2
        assert f"the {what} file {flags[-1]} is not a regular file" in capsys.readouterr().err
    eval_in_process([*base, "--answers-file", str(tmp_path / "a.jsonl"), "--errors-file", "/dev/null"])
    assert "not a regular file" not in capsys.readouterr().err  # (it goes on, to find no API on port 1)
