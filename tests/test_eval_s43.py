"""`llava-queue eval --script`, what the forty-third session added: the command line of `model_vqa_loader.py`, which
LLaVA's official benchmark scripts run (scripts/v1_5/eval/*.sh), with its own defaults: 128 new tokens, where
`model_vqa.py` hard-codes 1024, and `_mmtag` appended to a plain model's conversation template; and that of
`model_vqa_science.py` (ScienceQA), whose question file is a JSON list."""

import json
import os
import time
import uuid

import redis
import requests

from conftest import model_workers
from shared.vqa import question_prompt
from test_eval_cli import ANSWER_KEYS, MODEL
from test_eval_s30 import eval_in_process
from test_eval_s41 import image_folder, read_lines, write_questions

# A projector-pretrained ("plain") model's name, as the original names such checkpoints.
PLAIN = "llava-v1.5-tiny-pretrain-plain"


def loader_argv(stack, tmp_path, model_path: str, *extra: str) -> list[str]:
    """The loader's command line as scripts/v1_5/eval/textvqa.sh writes it, `python -m llava.eval.model_vqa_loader`
    turned into `llava-queue eval --script llava.eval.model_vqa_loader`: no --max_new_tokens."""
    return ["eval", "--script", "llava.eval.model_vqa_loader", "--model-path", model_path,
            "--question-file", str(tmp_path / "q.jsonl"), "--image-folder", str(tmp_path / "images"),
            "--answers-file", str(tmp_path / "answers" / "a.jsonl"), "--temperature", "0", "--api-url", stack.base_url,
            *extra]


def job_requests(stack, marker: str) -> list[dict]:
    """The recorded requests (prompt, max_new_tokens...) of the queue's jobs whose prompt holds `marker`."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    records = [client.hmget(key, ("prompt", "request")) for key in client.scan_iter("llq:job:*", count=1000)]
    return [json.loads(request) for prompt, request in records if marker in (prompt or "")]


def test_the_loaders_command_line_asks_with_its_defaults(tiny_llava_stack, tmp_path):
    # Run as the benchmark scripts run the loader, every question was asked for up to 1024 new tokens, model_vqa.py's
    # hard-coded number, not the loader's default 128: other answers than the original's where a model rambles.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    image_folder(tmp_path, 3)
    questions = write_questions(tmp_path / "q.jsonl", 3, marker, image=True)
    argv = loader_argv(tiny_llava_stack, tmp_path, f"/checkpoints/{MODEL}", "--conv-mode", "vicuna_v1")
    assert eval_in_process(argv) == 0
    assert [request["max_new_tokens"] for request in job_requests(tiny_llava_stack, marker)] == [128] * 3
    answers = tmp_path / "answers" / "a.jsonl"
    assert json.loads((tmp_path / "answers" / "a.jsonl.params").read_text())["max_new_tokens"] == 128
    lines = read_lines(answers)
    assert [list(line) for line in lines] == [ANSWER_KEYS] * 3
    assert [(line["question_id"], line["prompt"], line["model_id"]) for line in lines] == \
        [(question["question_id"], question["text"], MODEL) for question in questions]


def test_the_loader_gives_a_plain_model_its_mmtag_template(tiny_llava_stack, tiny_llava_dir, tmp_path, capsys):
    # The loader appends _mmtag to the template of a "plain" model (not a finetune) whose template has none; asked
    # with the template as given, such a model got another prompt than the original gives it.
    env = {name: value for name, value in os.environ.items()
           if name not in ("LLAVA_QUEUE_MODEL_BASE", "LLAVA_QUEUE_VISION_TOWER")}
    env.update(LLAVA_QUEUE_MODEL_PATH=str(tiny_llava_dir), LLAVA_QUEUE_DEVICE="cpu", LLAVA_QUEUE_DTYPE="float32")
    marker = f" [{uuid.uuid4().hex[:8]}]"
    image_folder(tmp_path, 2)
    questions = write_questions(tmp_path / "q.jsonl", 2, marker, image=True)
    with model_workers(tiny_llava_stack, env, [PLAIN]):
        deadline = time.monotonic() + 120
        # (model_workers waits for one worker announced: the stack's own counts.)
        while PLAIN not in [model["id"] for model in
                            requests.get(f"{tiny_llava_stack.base_url}/v1/models", timeout=10).json()["data"]]:
            assert time.monotonic() < deadline, "the plain model's worker never announced itself"
            time.sleep(0.3)
        argv = loader_argv(tiny_llava_stack, tmp_path, f"/checkpoints/{PLAIN}", "--max_new_tokens", "4")
        capsys.readouterr()
        assert eval_in_process([*argv, "--conv-mode", "v1"]) == 0
        assert "appends _mmtag to --conv-mode v1 for the plain model" in capsys.readouterr().err
        prompts = sorted(request["prompt"] for request in job_requests(tiny_llava_stack, marker))
        assert prompts == sorted(question_prompt(question["text"], "v1_mmtag") for question in questions)
        assert json.loads((tmp_path / "answers" / "a.jsonl.params").read_text())["conv_mode"] == "v1_mmtag"
        assert [line["model_id"] for line in read_lines(tmp_path / "answers" / "a.jsonl")] == [PLAIN] * 2

        # The default llava_v1 becomes llava_v1_mmtag, which is no template: the original fails on it (a KeyError).
        assert eval_in_process([*argv, "--answers-file", str(tmp_path / "b.jsonl")]) == 2
        err = capsys.readouterr().err
        assert "unknown conversation template 'llava_v1_mmtag'" in err and "for the plain model" in err, err
        # Named by no model, a job goes to whichever worker takes it: the template cannot be chosen.
        no_model = [arg for arg in argv if arg not in ("--model-path", f"/checkpoints/{PLAIN}")]
        assert eval_in_process([*no_model, "--conv-mode", "v1", "--answers-file", str(tmp_path / "c.jsonl")]) == 2
        assert f"such as {PLAIN!r}" in capsys.readouterr().err
        # model_vqa.py, the default, keeps the template as given.
        default = [arg for arg in argv if arg not in ("--script", "llava.eval.model_vqa_loader")]
        assert eval_in_process([*default, "--conv-mode", "v1", "--answers-file", str(tmp_path / "d.jsonl")]) == 0
        assert json.loads((tmp_path / "d.jsonl.params").read_text())["conv_mode"] == "v1"
    assert len(job_requests(tiny_llava_stack, marker)) == 4



def test_scienceqas_question_file_is_answered_as_model_vqa_science_answers_it(tiny_llava_stack, tmp_path, capsys):
    # model_vqa_science.py (scripts/v1_5/eval/sqa.sh) reads a JSON list of {id, conversations, [image]}, not JSON
    # lines: it could not be run at all. Its answers line echoes the prompt with "<image>\n" before it when the
    # question has an image, and with --single-pred-prompt the instruction after it.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    image_folder(tmp_path, 1)
    entries = [{"id": "sqa-1", "image": "img_0.png",
                "conversations": [{"from": "human", "value": f"<image>\nWhich is it?{marker}\nA. one\nB. two"},
                                  {"from": "gpt", "value": "A"}]},
               {"id": "sqa-2", "conversations": []},
               {"id": "sqa-3", "conversations": [{"from": "human", "value": f"Which is it?{marker}\nA. one"}]}]
    (tmp_path / "q.json").write_text(json.dumps(entries, indent=2))
    answers = tmp_path / "a.jsonl"
    argv = ["eval", "--script", "model_vqa_science", "--model-path", f"/checkpoints/{MODEL}", "--question-file",
            str(tmp_path / "q.json"), "--image-folder", str(tmp_path / "images"), "--answers-file", str(answers),
            "--single-pred-prompt", "--temperature", "0", "--max_new_tokens", "4", "--api-url",
            tiny_llava_stack.base_url]
    assert eval_in_process(argv) == 1
    instruction = "\nAnswer with the option's letter from the given choices directly."
    texts = [f"Which is it?{marker}\nA. one\nB. two{instruction}", f"Which is it?{marker}\nA. one{instruction}"]
    lines = read_lines(answers)
    assert [list(line) for line in lines] == [ANSWER_KEYS] * 2
    assert [(line["question_id"], line["prompt"], line["model_id"]) for line in lines] == \
        [("sqa-1", f"<image>\n{texts[0]}", MODEL), ("sqa-3", texts[1], MODEL)]
    # The script's own default template, llava_v0; the image only where the entry names one.
    assert sorted(request["prompt"] for request in job_requests(tiny_llava_stack, marker)) == \
        sorted([question_prompt(texts[0], "llava_v0"), question_prompt(texts[1], "llava_v0", with_image=False)])
    [error] = read_lines(tmp_path / "a.jsonl.errors")
    assert (error["question_id"], error["line"]) == ("sqa-2", 2) and "conversations[0].value" in error["error"]

    # Run again, the answers are matched by the prompts they echo: nothing is asked twice.
    capsys.readouterr()
    assert eval_in_process(argv) == 1
    assert "2 answered (2 before this run), 1 failed" in capsys.readouterr().out
    assert read_lines(answers) == lines and len(job_requests(tiny_llava_stack, marker)) == 2
    # --answer-prompter, which model_vqa_science.py takes and reads nowhere (it was refused): nothing changes.
    assert eval_in_process([*argv, "--answer-prompter"]) == 1
    assert "2 answered (2 before this run), 1 failed" in capsys.readouterr().out
    assert len(job_requests(tiny_llava_stack, marker)) == 2
