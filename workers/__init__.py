"""The GPU worker: Celery tasks and the batching engine that serves the model."""
