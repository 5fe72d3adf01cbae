"""`llava-queue eval` resumed, what the forty-first session found: `--model` added or dropped on a rerun took the
earlier run's jobs for another parameters' and asked their questions again; an image gone before a rerun made the
group an earlier run posted (and lost the ids of) a group under a new key, and asked its questions again."""

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from llava_fixtures import b64, png_bytes
from test_eval_s30 import eval_argv, eval_in_process, jobs_with
from shared.vqa import EvalParams, Question, question_job


def write_questions(path: Path, count: int, marker: str, image: bool = False) -> list[dict]:
    """A question file of `count` questions (question i about img_i.png, if `image`)."""
    questions = [{"question_id": index, "text": f"Say something about the number {index}.{marker}",
                  **({"image": f"img_{index}.png"} if image else {})} for index in range(count)]
    path.write_text("".join(json.dumps(question) + "\n" for question in questions))
    return questions


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def served_model(stack) -> str:
    [model] = [model["id"] for model in requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"]]
    return model


def stop_with_jobs_in_flight(argv: list[str], jobs_file: Path) -> None:
    """Run `argv` and SIGTERM it once the jobs file names job ids (jobs in the queue); it must exit 130."""
    run = subprocess.Popen([sys.executable, "-m", "shared.cli", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run.poll() is None:
            if jobs_file.exists() and any("job_ids" in json.loads(line) for line in
                                          jobs_file.read_text().splitlines() if line.endswith("}")):
                break
            time.sleep(0.01)
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, out + err
    assert "still in the queue" in err, err


def test_model_named_or_not_on_a_rerun_collects_the_jobs_in_the_queue(stack, tmp_path, capsys):
    # The first run named no model (or named the one served), the rerun the other way round: the jobs file's records
    # were "submitted with other parameters", not collected, and their questions asked a second time.
    model = served_model(stack)
    for first, rerun in (([], ["--model", model]), (["--model", model], [])):
        marker = f" [{uuid.uuid4().hex[:8]}]"
        folder = tmp_path / uuid.uuid4().hex[:6]
        folder.mkdir()
        write_questions(folder / "q.jsonl", 12, marker)
        answers = folder / "a.jsonl"
        stop_with_jobs_in_flight(eval_argv(stack, folder / "q.jsonl", answers, "--max-in-flight", "4", *first,
                                           tokens=48), folder / "a.jsonl.jobs")
        capsys.readouterr()
        assert eval_in_process(eval_argv(stack, folder / "q.jsonl", answers, "--max-in-flight", "4", *rerun,
                                         tokens=48)) == 0
        out, err = capsys.readouterr()
        assert "submitted with other parameters" not in err, err
        assert "0 collected" not in out, out
        assert [line["question_id"] for line in read_lines(answers)] == list(range(12))
        assert jobs_with(stack, marker) == 12, (first, rerun, out, err)


def test_jobs_of_another_named_model_stop_the_rerun_saying_so(stack, tmp_path, capsys):
    # Jobs submitted for another model than the rerun names are not this run's: it stops before asking anything and
    # says which flag collects them (they were dropped with "other parameters", and every question asked again).
    marker = f" [{uuid.uuid4().hex[:8]}]"
    question_file, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    write_questions(question_file, 3, marker)
    params = EvalParams(model="llava-v1.5-13b", temperature=0, max_new_tokens=4)
    run = {**params.model_dump(), "question_file": str(question_file.resolve()),
           "image_folder": str(Path("").resolve())}
    (tmp_path / "a.jsonl.jobs").write_text(json.dumps({"key": uuid.uuid4().hex, "params": run,
                                                       "question_ids": [0, 1, 2], "lines": [1, 2, 3]}) + "\n")
    assert eval_in_process(eval_argv(stack, question_file, answers, "--model", served_model(stack))) == 2
    err = capsys.readouterr().err
    assert "submitted for model 'llava-v1.5-13b'" in err and "--model llava-v1.5-13b" in err, err
    assert jobs_with(stack, marker) == 0
    assert (tmp_path / "a.jsonl.jobs").exists()


def image_folder(tmp_path: Path, count: int) -> Path:
    """A folder of `count` small distinct PNGs, img_0.png onwards (write_questions' `image=True` names them)."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(count):
        (images / f"img_{index}.png").write_bytes(png_bytes(30 + index, 24, seed=index))
    return images


def test_an_image_gone_before_a_rerun_asks_no_question_twice(tiny_llava_stack, tmp_path, capsys):
    # An earlier run recorded two groups and stopped as it posted them: the first went through (its ids were never
    # written down), the second did not. Then an image of each group went missing. Each group was posted under a new
    # key without the question that failed: the first group's questions were asked again.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    images = image_folder(tmp_path, 6)
    question_file, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions = write_questions(question_file, 6, marker, image=True)
    params = EvalParams(temperature=0, max_new_tokens=4)
    run = {**params.model_dump(), "question_file": str(question_file.resolve()), "image_folder": str(images)}
    posted_key, unposted_key = uuid.uuid4().hex, uuid.uuid4().hex
    jobs = [question_job(Question(**question), params, b64((images / question["image"]).read_bytes()))
            for question in questions[:3]]
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/jobs/bulk", headers={"Idempotency-Key": posted_key},
                             json={"jobs": [job.model_dump(mode="json", exclude_none=True) for job in jobs]},
                             timeout=30)
    assert response.status_code == 202, response.text
    (tmp_path / "a.jsonl.jobs").write_text(
        json.dumps({"key": posted_key, "params": run, "question_ids": [0, 1, 2], "lines": [1, 2, 3]}) + "\n"
        + json.dumps({"key": unposted_key, "params": run, "question_ids": [3, 4, 5], "lines": [4, 5, 6]}) + "\n")
    gone = {name: (images / name).read_bytes() for name in ("img_1.png", "img_4.png")}
    for name in gone:
        (images / name).unlink()

    argv = eval_argv(tiny_llava_stack, question_file, answers, "--image-folder", str(images))
    assert eval_in_process(argv) == 1
    assert jobs_with(tiny_llava_stack, marker) == 5
    # The group never posted is posted without its missing image; the one posted before is kept for later.
    assert [line["question_id"] for line in read_lines(answers)] == [3, 5]
    errors = {error["line"]: error["error"] for error in read_lines(tmp_path / "a.jsonl.errors")}
    assert sorted(errors) == [1, 2, 3, 5], errors
    assert "cannot read image 'img_1.png'" in errors[2] and "cannot read image 'img_4.png'" in errors[5]
    assert "put it back and run the same command again" in errors[1] and "line(s) 2" in errors[1]

    # The images back, the rerun collects the first post's jobs and asks the last missing question.
    for name, data in gone.items():
        (images / name).write_bytes(data)
    capsys.readouterr()
    assert eval_in_process(argv) == 0
    out = capsys.readouterr().out
    assert "6 answered (2 before this run), 0 failed" in out, out
    assert [line["question_id"] for line in read_lines(answers)] == list(range(6))
    assert jobs_with(tiny_llava_stack, marker) == 6
    assert not (tmp_path / "a.jsonl.jobs").exists()


def test_a_sigterm_while_the_files_are_written_does_not_kill_the_run(stack, tmp_path):
    # The run put the default SIGTERM handler back before it wrote its files at the end: a SIGTERM then (a scheduler
    # stopping a run that was finishing) killed it with status 143, the answers file left in the order the answers
    # came and the jobs file not brought up to date. Here the SIGTERM comes as the answers file is rewritten.
    write_questions(tmp_path / "q.jsonl", 4, "")
    answers = tmp_path / "a.jsonl"
    script = ("import os, signal, sys\n"
              "import shared.eval_cli as eval_cli\n"
              "from shared.cli import build_parser\n"
              "write = eval_cli.write_atomically\n"
              "def write_signalled(path, lines):\n"
              "    if path.name == 'a.jsonl' and lines:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    write(path, lines)\n"
              "eval_cli.write_atomically = write_signalled\n"
              "args = build_parser().parse_args(sys.argv[1:])\n"
              "sys.exit(args.func(args))\n")
    done = subprocess.run([sys.executable, "-c", script, *eval_argv(stack, tmp_path / "q.jsonl", answers)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, (done.returncode, done.stdout + done.stderr)
    assert "4 answered (0 before this run)" in done.stdout
    assert [line["question_id"] for line in read_lines(answers)] == [0, 1, 2, 3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.params", "q.jsonl"]
