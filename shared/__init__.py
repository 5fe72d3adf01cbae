"""What api/ and workers/ both need: protocol, templates, settings, the job store, the Celery app.

Nothing in this package imports torch or transformers.
"""
