"""`llava-queue eval` run again with other sampling parameters: the answers of the first run were kept as the second
run's own (the original's answer lines name no parameters); now the run stops and says which differ."""

import json

from test_eval_cli import eval_args, eval_in_process, images, read_lines, write_questions  # noqa: F401 (fixture)


def test_a_rerun_with_other_parameters_stops_instead_of_keeping_earlier_answers(
        tiny_llava_stack, images, tmp_path, capsys):  # noqa: F811
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    write_questions(questions, [0, 1, 2])
    assert eval_in_process(eval_args(tiny_llava_stack, questions, images, answers)) == 0
    first = answers.read_bytes()
    capsys.readouterr()

    # The same command resumes (nothing left to ask); another temperature or token limit stops, the file untouched.
    assert eval_in_process(eval_args(tiny_llava_stack, questions, images, answers)) == 0
    assert "3 answered (3 before this run)" in capsys.readouterr().out
    for extra, words in ((["--temperature", "0.7", "--seed", "1"], "temperature 0.0 there, 0.7 here"),
                         (["--max_new_tokens", "4"], "max_new_tokens 8 there, 4 here")):
        # (eval_args passes --temperature 0 --max_new_tokens 8; a flag given again takes the later value)
        assert eval_in_process(eval_args(tiny_llava_stack, questions, images, answers, *extra)) == 2
        err = capsys.readouterr().err
        assert words in err and "--overwrite" in err, err
        assert answers.read_bytes() == first
    recorded = json.loads((tmp_path / "a.jsonl.params").read_text())
    assert recorded["temperature"] == 0 and recorded["max_new_tokens"] == 8, recorded
    # --overwrite starts over with the new parameters, and records them.
    assert eval_in_process(eval_args(tiny_llava_stack, questions, images, answers, "--max_new_tokens", "4",
                                     "--overwrite")) == 0
    assert "3 answered (0 before this run)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.jsonl.params").read_text())["max_new_tokens"] == 4
    assert len(read_lines(answers)) == 3
