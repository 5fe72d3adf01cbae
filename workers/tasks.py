"""The Celery task: thin, it hands the job id to the runner of this worker process."""

from shared.celery_app import GENERATE_TASK, celery_app
from workers.generation import JobRunner

_runner: JobRunner | None = None


def install(runner: JobRunner) -> None:
    """Make `runner` serve the tasks this process receives (called once the model is loaded)."""
    global _runner
    _runner = runner


@celery_app.task(name=GENERATE_TASK)
def generate(job_id: str) -> str:
    """Run the job `job_id` to its end; its result lives in the job record."""
    if _runner is None:
        raise RuntimeError("this worker process has no model loaded")
    return _runner.run(job_id)
