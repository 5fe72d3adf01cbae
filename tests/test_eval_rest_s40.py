"""`llava-queue eval`, what a review of the fortieth session found left: a group posted one job at a time that met a
full queue waited out its Retry-After without following its jobs; a rerun with `--top_p 1.0`, where the first run
gave no top_p (the same sampling), stopped on a parameter mismatch; the progress line said "0:00:00 left" when the
first questions to finish were bad lines."""

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests

from conftest import run_stack
from shared.cli import build_parser
from shared.redis_server import RedisServer
from shared.vqa import EvalParams, Question, question_job


def write_questions(path: Path, count: int, marker: str = "") -> list[dict]:
    """A text-only question file of `count` questions."""
    questions = [{"question_id": index, "text": f"Say something about the number {index}.{marker}"}
                 for index in range(count)]
    path.write_text("".join(json.dumps(question) + "\n" for question in questions))
    return questions


def eval_argv(stack, questions: Path, answers: Path, *extra: str) -> list[str]:
    return ["eval", "--question-file", str(questions), "--answers-file", str(answers), "--api-url", stack.base_url,
            "--max_new_tokens", "4", *extra]


def eval_in_process(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def jobs_with(stack, marker: str) -> int:
    """How many job records the queue holds whose prompt holds `marker`."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    return sum(marker in (client.hget(key, "prompt") or "") for key in client.scan_iter("llq:job:*", count=1000))


def test_a_group_posted_one_job_at_a_time_follows_its_jobs_while_the_queue_is_full(tmp_path):
    # Room for 2 queued jobs, groups of 4 (--max-in-flight 8), no worker: the bulk post is refused (400, larger than
    # the queue), its jobs go one at a time, and the third is put off (429, Retry-After 30 s: nothing drains the
    # queue). The post waited those 30 s (up to an hour) where it stood, polling nothing: the two jobs in the queue,
    # cancelled meanwhile, were seen to end only after it.
    write_questions(tmp_path / "q.jsonl", 6)
    answers = tmp_path / "a.jsonl"
    with RedisServer() as redis_server, run_stack(redis_server.url, {"LLAVA_QUEUE_MAX_QUEUED_JOBS": "2"}, workers=(),
                                                   log_prefix="llava-queue-eval-one-by-one-") as stack:
        run = subprocess.Popen([sys.executable, "-m", "shared.cli",
                                *eval_argv(stack, tmp_path / "q.jsonl", answers, "--max-in-flight", "8")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen = []
            for line in run.stderr:
                seen.append(line)
                if "retrying in" in line:
                    break
            assert "the queue is full (2 jobs queued, limit 2)" in "".join(seen), "".join(seen)
            queued = requests.get(f"{stack.base_url}/v1/jobs", params={"status": "queued"}, timeout=10).json()["data"]
            assert len(queued) == 2, queued
            for job in queued:
                assert requests.delete(f"{stack.base_url}/v1/jobs/{job['id']}", timeout=10).status_code == 202
            errors = tmp_path / "a.jsonl.errors"
            deadline = time.monotonic() + 15  # half the Retry-After
            while time.monotonic() < deadline and len(read_lines(errors) if errors.exists() else []) < 2:
                time.sleep(0.05)
            failed = read_lines(errors) if errors.exists() else []
            run.send_signal(signal.SIGINT)
            _, err = run.communicate(timeout=30)
        finally:
            run.kill()
    assert [(error["question_id"], "job cancelled" in error["error"]) for error in failed] == [(0, True), (1, True)], \
        "".join(seen) + err
    assert run.returncode == 130, "".join(seen) + err
    # The rest of the group waits to be posted, under a key of its own: the next run posts it.
    [state] = read_lines(tmp_path / "a.jsonl.jobs")
    assert state["question_ids"] == [2, 3] and "job_ids" not in state, state
    assert "2 being posted" in err, err


@pytest.mark.parametrize("first, again", [
    (["--temperature", "0.7"], ["--temperature", "0.7", "--top_p", "1.0"]),  # no top_p samples from them all
    (["--temperature", "0", "--top_p", "0.5", "--seed", "3"], ["--temperature", "0.0"]),  # greedy reads neither
    (["--conv-mode", "v1"], ["--conv-mode", "vicuna_v1"]),  # two names of one template
    ([], ["--conv-mode", "llava_v1", "--temperature", "0.2", "--max_new_tokens", "4"]),  # the defaults, stated
])
def test_a_rerun_that_makes_the_same_jobs_goes_on(stack, tmp_path, capsys, first, again):
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    write_questions(questions, 2)
    assert eval_in_process(eval_argv(stack, questions, answers, *first)) == 0
    capsys.readouterr()
    assert eval_in_process(eval_argv(stack, questions, answers, *again)) == 0, capsys.readouterr().err
    assert "2 answered (2 before this run), 0 failed; this run: 0 jobs submitted" in capsys.readouterr().out


def test_a_rerun_that_samples_otherwise_still_stops(stack, tmp_path, capsys):
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    write_questions(questions, 2)
    assert eval_in_process(eval_argv(stack, questions, answers, "--temperature", "0.7", "--top_p", "0.9")) == 0
    capsys.readouterr()
    assert eval_in_process(eval_argv(stack, questions, answers, "--temperature", "0.7")) == 2
    assert "(top_p 0.9 there, None here;" in capsys.readouterr().err
    # Greedy then sampling: the temperature differs, and only it is named (no top_p was given either time).
    assert eval_in_process(eval_argv(stack, questions, tmp_path / "b.jsonl", "--temperature", "0")) == 0
    capsys.readouterr()
    assert eval_in_process(eval_argv(stack, questions, tmp_path / "b.jsonl", "--temperature", "0.7")) == 2
    assert "(temperature 0.0 there, 0.7 here;" in capsys.readouterr().err


def test_jobs_of_an_earlier_run_that_sample_alike_are_collected(stack, tmp_path, capsys):
    # The earlier run (no top_p) posted its group and died before writing the job ids down; this one names top_p
    # 1.0, which makes the same jobs. Its group was taken for another parameters' and asked again: twice the jobs.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    question_file, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions = write_questions(question_file, 3, marker)
    params = EvalParams(temperature=0.7, max_new_tokens=4)
    key = uuid.uuid4().hex
    jobs = [question_job(Question(**question), params, None).model_dump(mode="json", exclude_none=True)
            for question in questions]
    posted = requests.post(f"{stack.base_url}/v1/jobs/bulk", headers={"Idempotency-Key": key}, json={"jobs": jobs},
                           timeout=30)
    assert posted.status_code == 202, posted.text
    run = {**params.model_dump(), "question_file": str(question_file.resolve()),
           "image_folder": str(Path("").resolve())}
    (tmp_path / "a.jsonl.jobs").write_text(json.dumps({"key": key, "params": run, "question_ids": [0, 1, 2],
                                                       "lines": [1, 2, 3]}) + "\n")

    assert eval_in_process(eval_argv(stack, question_file, answers, "--temperature", "0.7", "--top_p", "1.0")) == 0
    err = capsys.readouterr().err
    assert "submitted with other parameters" not in err, err
    assert [line["question_id"] for line in read_lines(answers)] == [0, 1, 2]
    assert jobs_with(stack, marker) == 3


def test_bad_lines_that_fail_at_once_tell_nothing_of_the_time_left(stack, tmp_path, capsys):
    # The first progress line, drawn once the first group is posted, reckoned the time left from the questions
    # finished so far: two bad lines, failed in no time, made it "0:00:00 left" with two questions to go.
    questions = tmp_path / "q.jsonl"
    questions.write_text("{not json\n" * 2 + "".join(json.dumps({"question_id": n, "text": f"Why {n}?"}) + "\n"
                                                     for n in range(2)))
    assert eval_in_process(eval_argv(stack, questions, tmp_path / "a.jsonl")) == 1
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval ")]
    assert progress[0].startswith("eval 2/4 ") and progress[0].endswith(" ? left"), progress
    assert progress[-1].startswith("eval 4/4 ") and progress[-1].endswith(" 0:00:00 left"), progress
