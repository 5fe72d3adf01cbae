"""The Celery task: thin, it hands the job id to the runner of this worker process."""

import logging
import re

from shared.celery_app import GENERATE_TASK, celery_app
from workers.generation import JobRunner

log = logging.getLogger("llava_queue.worker")

_runner: JobRunner | None = None
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def install(runner: JobRunner) -> None:
    """Make `runner` serve the tasks this process receives (called once the model is loaded)."""
    global _runner
    _runner = runner


@celery_app.task(name=GENERATE_TASK, Request="workers.pool:JobRequest")
def generate(job_id: str) -> str:
    """Run the job `job_id` to its end; its result lives in the job record.

    A message that does not carry a job id is dropped without running anything.
    """
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        log.warning("dropped a task message that is not a job id: %.100r", job_id)
        return "rejected"
    if _runner is None:
        raise RuntimeError("this worker process has no model loaded")
    return _runner.run(job_id)
