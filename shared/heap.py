"""Start-up objects kept out of the garbage collector's full collections.

A full (generation 2) collection walks every tracked object the process holds and runs with the
GIL held. A worker's start-up leaves about 413,000 of them (torch, transformers, Celery, the model's
modules), an API's about 88,000 (FastAPI, pydantic): measured here, one full collection took
253-281 ms in a worker with the default model loaded and 47-50 ms in an API, and for that long the
engine thread cannot start its next step, or the API's event loop cannot relay a chunk or answer a
request (the stack's benchmark recorded one of 67 ms in the API during three rounds of 32 streams).
Python runs one when the objects that survived since the last outgrow a quarter of those it had, so
a server meets them from time to time as jobs come and go. `gc.freeze()` moves every object
tracked so far into a permanent generation that collections skip: after it, the same collection
took under 0.1 ms in both. Collections of what is allocated later work as before.
"""

import gc


def freeze_startup_heap() -> int:
    """Collect the garbage of start-up, then exempt every object left from later collections; returns their number.

    Call it once, when start-up is over (the model loaded and warmed up, the app built).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
