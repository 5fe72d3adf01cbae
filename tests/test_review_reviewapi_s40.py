"""A review of the fortieth session's API and eval client code: the defects found, each as a user meets it."""

import json

from test_eval_poll_s40 import eval_behind_an_older_api


def test_an_api_without_ids_loses_no_job_of_a_round_of_several_pages(tiny_llava_dir, tmp_path):
    # 125 jobs due at the first round are two pages (100 and 25). The first page's answer, the older API's newest
    # jobs, showed it has no `ids`; the second's, read with `ids` too, was then taken for the ids answer: its jobs
    # not among the newest 20 were "unknown to the API", asked again (more jobs than questions) while the first
    # ones ran on unread.
    questions = 125
    # One group of all the questions (a group is at most half of --max-in-flight), all due at the first round.
    done, answers = eval_behind_an_older_api(tiny_llava_dir, tmp_path, questions, max_num_seqs=16, max_new_tokens=2,
                                             max_in_flight=2 * questions, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count("has no GET /v1/jobs?ids= (an older llava-queue)") == 1, done.stderr
    assert (f"{questions} answered (0 before this run), 0 failed; this run: {questions} jobs submitted"
            in done.stdout), done.stdout
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == list(range(questions))
