"""`llava-queue eval` resumed, what the forty-second session found: answers of another model than `--model` names
were asked again and replaced (its jobs in the queue stop the run); jobs submitted for no model and collected by a run
naming one were recorded as that model's; a group kept for an image gone for good failed its lines on every rerun."""

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from conftest import run_stack
from llava_fixtures import b64
from shared.redis_server import RedisServer
from shared.vqa import EvalParams, Question, question_job
from test_eval_s30 import eval_argv, eval_in_process, jobs_with
from test_eval_s41 import image_folder, read_lines, served_model, stop_with_jobs_in_flight, write_questions


@pytest.fixture(scope="module")
def no_worker():
    """An API and its Redis, and no worker: the jobs stay queued, so a run always stops with jobs in the queue."""
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-eval-s42-") as stack:
        yield stack


def stopped_at_its_first_progress_line(argv: list[str]) -> tuple[int, str]:
    """Run `argv` until it prints its progress line (it has taken over the jobs file and posted what it had to), then
    SIGTERM it; its exit status and what it printed."""
    run = subprocess.Popen([sys.executable, "-m", "shared.cli", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in run.stderr:
            seen.append(line)
            if line.startswith("eval "):
                break
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    return run.returncode, "".join(seen) + out + err


def test_answers_of_another_model_stop_the_rerun_as_its_jobs_do(stack, tmp_path, capsys):
    # An answer line by another model than the rerun names was asked again and its line replaced: that model's
    # answers thrown away, where its jobs in the queue stop the run. Now its answers stop it too, before anything.
    model = served_model(stack)
    marker = f" [{uuid.uuid4().hex[:8]}]"
    write_questions(tmp_path / "q.jsonl", 3, marker)
    answers = tmp_path / "a.jsonl"
    argv = eval_argv(stack, tmp_path / "q.jsonl", answers, "--model", model)
    assert eval_in_process(argv) == 0
    lines = read_lines(answers)
    lines[1]["model_id"] = "llava-v1.5-13b"
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    capsys.readouterr()
    assert eval_in_process(argv) == 2
    err = capsys.readouterr().err
    assert f"1 answers in {answers} were made by model 'llava-v1.5-13b', not {model!r}" in err, err
    assert "run with --model llava-v1.5-13b" in err and "--overwrite" in err, err
    assert read_lines(answers) == lines and jobs_with(stack, marker) == 3
    assert eval_in_process([*argv, "--overwrite"]) == 0
    assert [line["model_id"] for line in read_lines(answers)] == [model] * 3


def test_jobs_submitted_for_no_model_stay_so_when_a_run_naming_one_collects_them(no_worker, tmp_path):
    # A run naming model-x collected them and stopped: the jobs file recorded them as model-x's, and a run naming
    # model-z stopped, saying they "were submitted for model 'model-x'".
    marker = f" [{uuid.uuid4().hex[:8]}]"
    write_questions(tmp_path / "q.jsonl", 4, marker)
    argv = eval_argv(no_worker, tmp_path / "q.jsonl", tmp_path / "a.jsonl", "--max-in-flight", "8")
    stop_with_jobs_in_flight(argv, tmp_path / "a.jsonl.jobs")
    status, text = stopped_at_its_first_progress_line([*argv, "--model", "model-x"])
    assert status == 130 and "4 jobs still in the queue" in text, text
    assert [record["params"]["model"] for record in read_lines(tmp_path / "a.jsonl.jobs")] == [None]
    status, text = stopped_at_its_first_progress_line([*argv, "--model", "model-z"])
    assert status == 130 and "4 jobs still in the queue" in text, text
    assert jobs_with(no_worker, marker) == 4


def test_a_group_of_no_model_is_posted_again_for_no_model(no_worker, tmp_path):
    # An earlier run naming no model posted a group and stopped before writing its ids down. A rerun naming a model
    # posted it for that model under the group's key: refused (422, another body), then posted one by one under new
    # keys, every question asked twice.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    questions = write_questions(tmp_path / "q.jsonl", 3, marker)
    params = EvalParams(temperature=0, max_new_tokens=4)
    key = uuid.uuid4().hex
    response = requests.post(f"{no_worker.base_url}/v1/jobs/bulk", headers={"Idempotency-Key": key}, timeout=30,
                             json={"jobs": [question_job(Question(**question), params, None).model_dump(
                                 mode="json", exclude_none=True) for question in questions]})
    assert response.status_code == 202, response.text
    run = {**params.model_dump(), "question_file": str((tmp_path / "q.jsonl").resolve()),
           "image_folder": str(Path("").resolve())}
    (tmp_path / "a.jsonl.jobs").write_text(json.dumps({"key": key, "params": run, "question_ids": [0, 1, 2],
                                                       "lines": [1, 2, 3]}) + "\n")
    status, text = stopped_at_its_first_progress_line(
        [*eval_argv(no_worker, tmp_path / "q.jsonl", tmp_path / "a.jsonl"), "--model", "model-x"])
    assert status == 130 and "3 jobs still in the queue" in text, text
    assert jobs_with(no_worker, marker) == 3
    [record] = read_lines(tmp_path / "a.jsonl.jobs")
    assert record["params"]["model"] is None and record["job_ids"] == response.json()["ids"]


def test_a_group_held_for_an_image_still_gone_is_asked_anew_on_the_next_rerun(tiny_llava_stack, tmp_path, capsys):
    # A group an earlier run posted (its ids never written down) is held when an image of it is gone, its other lines
    # failed with "put it back and run the same command again". Never put back, it failed them on every rerun.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    images = image_folder(tmp_path, 3)
    question_file, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions = write_questions(question_file, 3, marker, image=True)
    params = EvalParams(temperature=0, max_new_tokens=4)
    key = uuid.uuid4().hex
    jobs = [question_job(Question(**question), params, b64((images / question["image"]).read_bytes()))
            for question in questions]
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/jobs/bulk", headers={"Idempotency-Key": key},
                             json={"jobs": [job.model_dump(mode="json", exclude_none=True) for job in jobs]},
                             timeout=30)
    assert response.status_code == 202, response.text
    run = {**params.model_dump(), "question_file": str(question_file.resolve()), "image_folder": str(images)}
    (tmp_path / "a.jsonl.jobs").write_text(json.dumps({"key": key, "params": run, "question_ids": [0, 1, 2],
                                                       "lines": [1, 2, 3]}) + "\n")
    (images / "img_1.png").unlink()
    argv = eval_argv(tiny_llava_stack, question_file, answers, "--image-folder", str(images))
    assert eval_in_process(argv) == 1
    assert sorted(error["line"] for error in read_lines(tmp_path / "a.jsonl.errors")) == [1, 2, 3]

    capsys.readouterr()
    assert eval_in_process(argv) == 1
    err = capsys.readouterr().err
    assert "the image of line(s) 2 is still missing" in err and "line(s) 1, 3 asked again" in err, err
    assert [line["question_id"] for line in read_lines(answers)] == [0, 2]
    [error] = read_lines(tmp_path / "a.jsonl.errors")
    assert error["line"] == 2 and "cannot read image 'img_1.png'" in error["error"], error
    assert not (tmp_path / "a.jsonl.jobs").exists()
    assert jobs_with(tiny_llava_stack, marker) == 5

    # Later reruns fail the one line whose image is gone, as for any missing image, and say nothing more.
    assert eval_in_process(argv) == 1
    assert "still missing" not in capsys.readouterr().err
    assert [error["line"] for error in read_lines(tmp_path / "a.jsonl.errors")] == [2]
