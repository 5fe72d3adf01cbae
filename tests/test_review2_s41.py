"""The chat page's model list, read again every 30 s, through a worker that restarts: the model the user chose is
replaced while no worker serves it, and chosen again once one does; the notice that said it was no longer served goes.

Debian's Chromium (Playwright) against the real stack, a second real worker for a second model name, stopped and
started again; the page's clock is Playwright's, run forward so that the 30 s between readings need not be waited.
"""

import os
import time

import redis
import requests
from conftest import job_final, model_workers, run_stack
from playwright.sync_api import expect
from test_page import NO_CSP, RECORD_ANSWERS, browser

from shared.redis_server import RedisServer

__all__ = ["browser"]  # the fixture, shared with tests/test_page.py

RESTARTING = "page-restarting-model"
READ_AGAIN = 31_000  # ms: past the page's MODEL_REFRESH_MS


def served(base_url: str) -> list[str]:
    return [model["id"] for model in requests.get(f"{base_url}/v1/models", timeout=10).json()["data"]]


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_a_model_whose_worker_restarts_is_chosen_again_once_it_is_served(browser, stack, default_model_dir):
    # The list, read again every 30 s, replaced a model that a restarting worker (a rolling deploy, a crash) left
    # unserved for a while, and kept the replacement for good: the user's next messages went to another model than
    # the one they chose, and the notice line still said the model was no longer served once it was.
    env = dict(os.environ, LLAVA_QUEUE_MODEL_PATH=str(default_model_dir))
    page = browser.new_page(viewport={"width": 1280, "height": 860}, **NO_CSP)
    try:
        page.clock.install()
        with model_workers(stack, env, [RESTARTING]):
            wait_until(lambda: RESTARTING in served(stack.base_url), "the second worker never announced itself")
            page.goto(f"{stack.base_url}/")
            page.wait_for_function("document.getElementById('model').value !== ''", timeout=30_000)
            page.evaluate(RECORD_ANSWERS)
            model = page.get_by_label("Model")
            [other] = [name for name in served(stack.base_url) if name != RESTARTING]
            model.select_option(RESTARTING)  # the user's choice, not the first of the list
        wait_until(lambda: RESTARTING not in served(stack.base_url), "the stopped worker is still listed")
        page.clock.run_for(READ_AGAIN)
        expect(model).to_have_value(other)
        notice = page.locator("#notice")
        expect(notice).to_have_text(f"{RESTARTING} is no longer served: {other} is chosen now.")

        with model_workers(stack, env, [RESTARTING]):
            wait_until(lambda: RESTARTING in served(stack.base_url), "the restarted worker never announced itself")
            page.clock.run_for(READ_AGAIN)
            expect(model).to_have_value(RESTARTING)
            expect(notice).to_have_text(f"{RESTARTING} is served again: it is chosen again.")

            # A model the user chose meanwhile is theirs: the one that comes back does not take its place.
            model.select_option(other)
        wait_until(lambda: RESTARTING not in served(stack.base_url), "the stopped worker is still listed")
        page.clock.run_for(READ_AGAIN)
        expect(model).to_have_value(other)
        with model_workers(stack, env, [RESTARTING]):
            wait_until(lambda: RESTARTING in served(stack.base_url), "the restarted worker never announced itself")
            page.clock.run_for(READ_AGAIN)
            expect(model.locator("option")).to_have_count(2)
            expect(model).to_have_value(other)
    finally:
        page.close()


def test_a_redis_url_with_redis_py_query_options_runs_the_stack_on_its_database(default_model_dir):
    # LLAVA_QUEUE_REDIS_URL is redis-py's URL, and the settings take its query options (?db=, timeouts): Celery's
    # kombu was handed them as its own connection's arguments, and `api` and `worker` ended at start with
    # "TypeError: Connection._init_params() got an unexpected keyword argument 'db'" and a traceback.
    with RedisServer() as server:
        url = f"redis://127.0.0.1:{server.port}?db=5&socket_timeout=30&health_check_interval=10"
        with run_stack(url, {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir)}) as stack:
            submitted = requests.post(f"{stack.base_url}/v1/jobs", timeout=30, json={
                "messages": [{"role": "user", "text": "What is the capital of France?"}], "temperature": 0,
                "max_new_tokens": 8})
            assert submitted.status_code in (200, 201, 202), (submitted.text, stack.logs())
            job = job_final(stack, submitted.json()["id"], timeout=120)
            assert job["status"] == "succeeded" and job["text"], (job, stack.logs())
        # The broker used the database the job store used (redis-py's ?db=, over the URL's path), not database 0.
        broker_keys = [key for key in redis.Redis.from_url(url).keys("_kombu.binding.*")]
        assert broker_keys, "no queue of the broker in the job store's database"
        assert not redis.Redis(port=server.port, db=0).keys("*"), "the broker wrote to database 0"
