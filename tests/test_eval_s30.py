"""`llava-queue eval` at scale, as an evaluation pipeline runs it: the same command started twice, a Redis that loses
the jobs it holds, and an errors or answers file that is the null device (text questions, the default model).
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from shared.cli import build_parser


def write_questions(path: Path, count: int, marker: str, bad_line: bool = False) -> list[dict]:
    """A text-only question file of `count` questions (and a line that is not JSON, last, if `bad_line`)."""
    questions = [{"question_id": index, "text": f"Say something about the number {index}.{marker}"}
                 for index in range(count)]
    path.write_text("".join(json.dumps(question) + "\n" for question in questions) + ("{not json\n" * bad_line))
    return questions


def eval_argv(stack, questions: Path, answers: Path, *extra: str, tokens: int = 4) -> list[str]:
    return ["eval", "--question-file", str(questions), "--answers-file", str(answers), "--api-url", stack.base_url,
            "--temperature", "0", "--max_new_tokens", str(tokens), *extra]


def eval_in_process(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def jobs_with(stack, marker: str) -> int:
    """How many job records the queue holds whose prompt holds `marker`."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    return sum(marker in (client.hget(key, "prompt") or "") for key in client.scan_iter("llq:job:*", count=1000))


def test_the_same_command_run_twice_at_once_stops_the_second(stack, tmp_path, capsys):
    # Two runs of one command each asked every question (twice the work), and each rewrote the other's jobs file.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    write_questions(tmp_path / "q.jsonl", 16, marker)
    answers = tmp_path / "a.jsonl"
    argv = eval_argv(stack, tmp_path / "q.jsonl", answers, "--max-in-flight", "4", tokens=16)
    first = subprocess.Popen([sys.executable, "-m", "shared.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "a.jsonl.jobs").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, first.communicate()
        assert eval_in_process(argv) == 2
        assert f"another llava-queue eval (pid {first.pid}) is writing {answers}" in capsys.readouterr().err
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, out + err
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == list(range(16))
    assert jobs_with(stack, marker) == 16
    assert not (tmp_path / "a.jsonl.lock").exists()
    # Ended, the run lets the next one in.
    assert eval_in_process(argv) == 0 and "16 answered (16 before this run)" in capsys.readouterr().out


def test_jobs_whose_records_redis_lost_are_asked_again(stack, tmp_path, capsys):
    # A Redis restarted without its data: every job in flight was then a failed question, "its record expired?".
    marker = f" [{uuid.uuid4().hex[:8]}]"
    write_questions(tmp_path / "q.jsonl", 4, marker)
    answers = tmp_path / "a.jsonl"
    argv = eval_argv(stack, tmp_path / "q.jsonl", answers, tokens=64)
    run = subprocess.Popen([sys.executable, "-m", "shared.cli", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    lost = []
    try:
        deadline = time.monotonic() + 30
        while not lost and time.monotonic() < deadline:
            jobs_file = tmp_path / "a.jsonl.jobs"
            records = [json.loads(line) for line in jobs_file.read_text().splitlines()] if jobs_file.exists() else []
            lost = [job_id for record in records for job_id in record.get("job_ids", [])]
            time.sleep(0.01)
        assert lost, run.communicate()
        client.delete(*[f"llq:job:{job_id}" for job_id in lost])
        out, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, out + err
    assert "4 answered (0 before this run), 0 failed" in out
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [0, 1, 2, 3]
    assert not (tmp_path / "a.jsonl.errors").exists()


def test_a_null_device_errors_or_answers_file_is_never_replaced(stack, tmp_path, capsys):
    # /dev/null is taken as an answers or errors file; the end of a run renamed its rewritten file onto it, or
    # removed it when there was no error: as root, the system's /dev/null. A link to it shows what became of it.
    write_questions(tmp_path / "q.jsonl", 2, "", bad_line=True)
    errors_link, answers_link = tmp_path / "errors", tmp_path / "answers"
    os.symlink(os.devnull, errors_link)
    os.symlink(os.devnull, answers_link)
    assert eval_in_process(eval_argv(stack, tmp_path / "q.jsonl", tmp_path / "a.jsonl", "--errors-file",
                                     str(errors_link))) == 1
    assert errors_link.is_symlink()
    assert eval_in_process(eval_argv(stack, tmp_path / "q.jsonl", answers_link, "--errors-file", str(errors_link),
                                     "--overwrite")) == 1
    assert answers_link.is_symlink() and errors_link.is_symlink()
    write_questions(tmp_path / "q.jsonl", 2, "")  # no error: the errors file was removed
    assert eval_in_process(eval_argv(stack, tmp_path / "q.jsonl", tmp_path / "b.jsonl", "--errors-file",
                                     str(errors_link))) == 0
    assert errors_link.is_symlink()
    assert "2 answered" in capsys.readouterr().out
