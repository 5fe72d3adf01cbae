"""A review of the fortieth session's API and eval client code: the defects found, each as a user meets it."""

import http.server
import json
import subprocess
import sys
import threading

from conftest import run_stack
from shared.redis_server import RedisServer
from test_eval_poll_s40 import WithoutIds


def test_an_api_without_ids_loses_no_job_of_a_round_of_several_pages(tiny_llava_dir, tmp_path):
    # 125 jobs due at the first round are two pages (100 and 25). The first page's answer, the older API's newest
    # jobs, showed it has no `ids`; the second's, read with `ids` too, was then taken for the ids answer: its jobs
    # not among the newest 20 were "unknown to the API", asked again (more jobs than questions) while the first
    # ones ran on unread.
    questions = 125
    env = {"LLAVA_QUEUE_MODEL_PATH": str(tiny_llava_dir), "LLAVA_QUEUE_DEVICE": "cpu",
           "LLAVA_QUEUE_DTYPE": "float32", "LLAVA_QUEUE_MAX_NUM_SEQS": "16", "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "0"}
    lines = [json.dumps({"question_id": index, "text": f"Say {index}."}) + "\n" for index in range(questions)]
    (tmp_path / "q.jsonl").write_text("".join(lines))
    answers = tmp_path / "a.jsonl"
    with RedisServer() as redis_server, run_stack(redis_server.url, env, log_prefix="llava-queue-review-api-") as stack:
        handler = type("Handler", (WithoutIds,), {"api_url": stack.base_url})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        # One group of all the questions (a group is at most half of --max-in-flight), all due at the first round.
        argv = ["eval", "--question-file", str(tmp_path / "q.jsonl"), "--answers-file", str(answers), "--api-url",
                f"http://127.0.0.1:{server.server_address[1]}", "--temperature", "0", "--max_new_tokens", "2",
                "--max-in-flight", str(2 * questions)]
        try:
            done = subprocess.run([sys.executable, "-m", "shared.cli", *argv], capture_output=True, text=True,
                                  timeout=120)
        finally:
            server.shutdown()
            server.server_close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count("has no GET /v1/jobs?ids= (an older llava-queue)") == 1, done.stderr
    assert (f"{questions} answered (0 before this run), 0 failed; this run: {questions} jobs submitted"
            in done.stdout), done.stdout
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == list(range(questions))
