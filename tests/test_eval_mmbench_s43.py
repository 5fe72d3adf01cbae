"""`llava-queue eval --script model_vqa_mmbench`: the command line of LLaVA's `model_vqa_mmbench.py`
(scripts/v1_5/eval/mmbench.sh and mmbench_cn.sh), whose question file is a TSV with the images in it (base64), whose
`--all-rounds` asks each question once per option turn, and whose answer lines say the round and the options."""

import json
import uuid

from llava_fixtures import b64, png_bytes
from shared.vqa import question_prompt
from test_eval_cli import MODEL
from test_eval_s30 import eval_in_process, jobs_with
from test_eval_s41 import read_lines, stop_with_jobs_in_flight
from test_eval_s43 import job_requests

MMBENCH_KEYS = ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id", "model_id",
                "metadata"]
INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


def write_tsv(path, marker: str) -> list[str]:
    """An MMBench-like TSV as pandas reads it: a hint over two lines (quoted), a row without hint ("nan") whose options
    stop at the first absent one (C empty: its D is not read), a row with four options, one without its image. Returns
    the images, base64."""
    images = [b64(png_bytes(28 + index, 24, seed=index)) for index in range(3)]
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
            ["7", f"Which colour?{marker}", '"A hint\nover two lines"', "red", "green", "blue", "nan", "A", "colour",
             images[0]],
            ["8", f"How many?{marker}", "nan", "one", "two", "", "four", "B", "count", images[1]],
            ["9", f"Where?{marker}", "", "left", "right", "up", "down", "C", "place", images[2]],
            ["10", f"Lost image?{marker}", "", "yes", "no", "", "", "A", "lost", "nan"]]
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    return images


def mmbench_argv(stack, tmp_path, answers, *extra: str) -> list[str]:
    """mmbench.sh's command line, `python -m llava.eval.model_vqa_mmbench` turned into `llava-queue eval --script
    model_vqa_mmbench` (no --image-folder: the images are in the TSV)."""
    return ["eval", "--script", "model_vqa_mmbench", "--model-path", f"/checkpoints/{MODEL}", "--question-file",
            str(tmp_path / "mmbench.tsv"), "--answers-file", str(answers), "--single-pred-prompt", "--temperature",
            "0", "--api-url", stack.base_url, *extra]


def test_mmbenchs_tsv_is_asked_and_answered_as_model_vqa_mmbench_does(tiny_llava_stack, tmp_path, capsys):
    # --script took model_vqa, model_vqa_loader and model_vqa_science only: MMBench's TSV could not be run at all.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    write_tsv(tmp_path / "mmbench.tsv", marker)
    answers = tmp_path / "answers" / "a.jsonl"
    argv = mmbench_argv(tiny_llava_stack, tmp_path, answers, "--all-rounds", "--max_new_tokens", "48",
                        "--max-in-flight", "4")
    # Stopped with jobs in the queue, then run again: each round's job is collected as that round's answer.
    stop_with_jobs_in_flight(argv, tmp_path / "answers" / "a.jsonl.jobs")
    capsys.readouterr()
    assert eval_in_process(argv) == 1
    assert " 0 collected" not in capsys.readouterr().out

    hint = "A hint\nover two lines"
    colours = [f"{hint}\nWhich colour?{marker}\nA. {a}\nB. {b}\nC. {c}"
               for a, b, c in (("red", "green", "blue"), ("green", "blue", "red"), ("blue", "red", "green"))]
    places = ["left", "right", "up", "down"]
    expected = [(7, 0, colours[0], ["red", "green", "blue"], ["A", "B", "C"]),
                (7, 1, colours[1], ["green", "blue", "red"], ["B", "C", "A"]),
                (7, 2, colours[2], ["blue", "red", "green"], ["C", "A", "B"]),
                (8, 0, f"How many?{marker}\nA. one\nB. two", ["one", "two"], ["A", "B"]),
                (8, 1, f"How many?{marker}\nA. two\nB. one", ["two", "one"], ["B", "A"])]
    for turn in range(4):
        options = places[turn:] + places[:turn]
        expected.append((9, turn, f"Where?{marker}" + "".join(f"\n{char}. {option}" for char, option in
                                                            zip("ABCD", options)),
                         options, list("ABCD"[turn:] + "ABCD"[:turn])))
    lines = read_lines(answers)
    assert [list(line) for line in lines] == [MMBENCH_KEYS] * 9
    assert [(line["question_id"], line["round_id"], line["prompt"], line["options"], line["option_char"])
            for line in lines] == expected
    assert {line["model_id"] for line in lines} == {MODEL}
    # Asked once each (none twice across the stop), with the instruction after the options and the script's default
    # template; the row without its image fails alone.
    assert jobs_with(tiny_llava_stack, marker) == 9
    assert sorted(request["prompt"] for request in job_requests(tiny_llava_stack, marker)) == \
        sorted(question_prompt(prompt + INSTRUCTION, "llava_v1") for _, _, prompt, _, _ in expected)
    [error] = read_lines(tmp_path / "answers" / "a.jsonl.errors")
    assert (error["question_id"], error["line"]) == (10, 6) and "image" in error["error"], error

    # Run again, nothing is asked twice; in Chinese, the answers are another prompt's: the run stops saying so.
    assert eval_in_process(argv) == 1
    assert "9 answered (9 before this run), 1 failed" in capsys.readouterr().out
    assert eval_in_process([*argv, "--lang", "cn"]) == 2
    assert "made with other parameters" in capsys.readouterr().err
    assert read_lines(answers) == lines and jobs_with(tiny_llava_stack, marker) == 9


def test_mmbench_cn_asks_one_round_in_chinese(tiny_llava_stack, tmp_path, capsys):
    # mmbench_cn.sh: --lang cn ends each question in the Chinese instruction; without --all-rounds, round 0 only.
    marker = f" [{uuid.uuid4().hex[:8]}]"
    write_tsv(tmp_path / "mmbench.tsv", marker)
    answers = tmp_path / "cn.jsonl"
    argv = mmbench_argv(tiny_llava_stack, tmp_path, answers, "--lang", "cn", "--max_new_tokens", "4")
    assert eval_in_process([*argv, "--num-chunks", "2", "--chunk-idx", "1"]) == 1
    # Chunks of rows, as the original splits its table: the second holds rows 9 and 10.
    [line] = read_lines(answers)
    assert (line["question_id"], line["round_id"], line["option_char"]) == (9, 0, ["A", "B", "C", "D"])
    [request] = job_requests(tiny_llava_stack, marker)
    assert request["prompt"] == question_prompt(f"{line['prompt']}\n请直接回答选项字母。", "llava_v1")
    assert json.loads((tmp_path / "cn.jsonl.params").read_text())["max_new_tokens"] == 4
    # Its flags are its own.
    no_script = [arg for arg in argv if arg not in ("--script", "model_vqa_mmbench", "--single-pred-prompt")]
    assert eval_in_process([*no_script, "--answers-file", str(tmp_path / "b.jsonl")]) == 2
    assert "--lang is model_vqa_mmbench.py's" in capsys.readouterr().err
