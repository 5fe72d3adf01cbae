"""Jobs that name the worker's model and jobs that name none are taken in the order they joined the queue.

They wait in two Celery queues (`task_queue`): "interactive.<model>", read only by workers of that model, and
"interactive", read by any. A worker read them in the order it declares them, so every queued job naming its model
went before every job naming none (the page names the model, POST /v1/jobs need not), while each job's queue position
(`JobStore.queue_position`, by the order jobs joined the queue) counted the others ahead of it.
"""

import time

import requests

from conftest import job_final, run_stack
from shared.redis_server import RedisServer


def test_jobs_naming_the_model_and_jobs_naming_none_start_in_the_order_they_came(default_model_dir):
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "1"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-order-") as stack:
        model = requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]

        def submit(named: bool, new_tokens: int) -> str:
            body = {"prompt": "Count from 1 to 1000:", "temperature": 0, "max_new_tokens": new_tokens,
                    **({"model": model} if named else {})}
            response = requests.post(f"{stack.base_url}/v1/jobs", json=body, timeout=10)
            assert response.status_code == 202, response.text
            return response.json()["id"]

        blocker = submit(False, 200)  # holds the only slot while the others queue behind it
        deadline = time.monotonic() + 60
        while requests.get(f"{stack.base_url}/v1/jobs/{blocker}", timeout=10).json()["status"] != "running":
            assert time.monotonic() < deadline, "the blocking job never started"
            time.sleep(0.05)
        named = [False, True, False, True, True, False]
        waiting = [submit(kind, 4) for kind in named]
        positions = [requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()["queue_position"]
                     for job_id in waiting]
        assert positions == list(range(len(waiting))), positions
        started = {job_id: job_final(stack, job_id)["started_at"] for job_id in [blocker, *waiting]}
        order = sorted(waiting, key=started.get)
        assert order == waiting, [named[waiting.index(job_id)] for job_id in order]
        assert started[blocker] < started[waiting[0]]
