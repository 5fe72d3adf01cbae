"""Review of the forty-third session's probes' shared readings (api/routes/metrics.py's SharedReading) and eval's
`--script model_vqa_mmbench` resumed (shared/eval_cli.py)."""

import asyncio
import json
import time

from api.routes.metrics import SharedReading
from llava_fixtures import b64, png_bytes
from shared.cli import build_parser
from shared.eval_cli import EvalRun, mmbench_items, read_mmbench_rows
from shared.jobs import JobStore, WorkerRegistry
from shared.vqa import EvalParams


def test_a_reading_that_raises_no_redis_error_leaves_the_calls_waiting_no_answer_older_than_they_are(redis_server):
    """Calls that came while a reading was under way wait for the next one. When that one raised anything but a
    RedisError (a bug, a cancelled call), it was counted as read all the same: the calls that waited for it had the
    answer before it, which began before they came (a worker gone by then still shown), or None where there was none
    (/metrics answered 200 with an empty body, /readyz and /healthz a 500). Now they read Redis anew."""
    registry = WorkerRegistry(JobStore.from_url(redis_server.url).redis, "llq-review3-s43")
    registry.announce("w1", {"name": "w1", "model": "m", "ready": True}, ttl_seconds=60)

    async def calls(failing: set[int]) -> list:
        readings = []

        def read() -> list[str]:
            readings.append(None)
            number = len(readings)
            workers = [worker["name"] for worker in registry.workers()]
            time.sleep(0.3)
            if number in failing:
                raise RuntimeError(f"reading {number} failed")
            return workers

        shared = SharedReading(read)
        first = asyncio.create_task(shared.get())
        await asyncio.sleep(0.1)  # the first reading saw w1 and is under way
        registry.remove("w1")
        later = [asyncio.create_task(shared.get()) for _ in range(2)]  # they wait for the first; one reads next
        answers = await asyncio.gather(first, *later, return_exceptions=True)
        registry.announce("w1", {"name": "w1", "model": "m", "ready": True}, ttl_seconds=60)
        return [repr(answer) if isinstance(answer, Exception) else answer for answer in answers]

    assert asyncio.run(calls({2})) == [["w1"], "RuntimeError('reading 2 failed')", []]
    assert asyncio.run(calls({1, 2})) == ["RuntimeError('reading 1 failed')", "RuntimeError('reading 2 failed')", []]


def test_an_mmbench_group_posted_with_fewer_rounds_is_collected_round_by_round(tmp_path):
    """A group of an earlier run posted again with fewer questions (one could not be built now) writes its jobs'
    questions in the jobs file's "after" line. With --all-rounds they are (line, round): the after line's rounds were
    dropped when read, so its lines were paired with the first record's rounds, and the next run took a round's answer
    for another round of the row (same line, same question_id), and asked a round twice."""
    image = b64(png_bytes(28, 24))
    rows = [["index", "question", "hint", "A", "B", "C", "image"], ["7", "Which?", "nan", "x", "y", "z", image],
            ["8", "How?", "nan", "p", "q", "", image]]
    questions = tmp_path / "mmbench.tsv"
    questions.write_text("".join("\t".join(row) + "\n" for row in rows))
    args = build_parser().parse_args(["eval", "--script", "model_vqa_mmbench", "--all-rounds", "--question-file",
                                      str(questions), "--answers-file", str(tmp_path / "a.jsonl")])
    items = mmbench_items(read_mmbench_rows(questions), all_rounds=True, instruction=None)
    run = EvalRun(args, None, EvalParams(), items)
    before = {"key": "k", "params": run._params_for(None), **EvalRun._questions_of(items)}
    asked = items[1:]  # round 0 of the first row left out
    after = {"key": "k", "job_ids": ["j1", "j2", "j3", "j4"], **EvalRun._questions_of(asked)}
    run.state_path.write_text(json.dumps(before) + "\n" + json.dumps(after) + "\n")
    run._prepare_files()
    run._load_state({item.key: item for item in items})
    run.answers_file.close(), run.errors_file.close()
    assert {job_id: flight.item.place for job_id, flight in run.flights.items()} == \
        {"j1": (2, 1), "j2": (2, 2), "j3": (3, 0), "j4": (3, 1)}
