"""The original LLaVA worker endpoint, byte-compatible: NUL-delimited JSON frames of cumulative text."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from api.deps import AsyncRedis, CeleryApp, Store
from api.stream import follow_job
from api.submission import submit_job
from shared.protocol import ErrorCode, GenerateRequest, InvalidRequest, encode_chunk, parse_request

router = APIRouter(tags=["llava"])


@router.post("/worker_generate_stream", response_class=StreamingResponse)
async def worker_generate_stream(request: Request, store: Store, aredis: AsyncRedis, celery: CeleryApp):
    """Generate like the original worker: frames `{"text": prompt + output, "error_code": 0}` each followed by NUL.

    A bad request is answered 400 with one error frame (so original clients show the message);
    a failed job ends with an error frame whose `text` says why. A client that disconnects cancels the job.
    """
    try:
        body = parse_request(await request.body(), GenerateRequest)
    except InvalidRequest as exc:
        return Response(encode_chunk(exc.message, ErrorCode.INVALID_REQUEST), status_code=400)
    job_id = await asyncio.to_thread(submit_job, store, celery, body, "interactive")

    async def frames():
        ended = False
        try:
            async for event in follow_job(store, aredis, job_id):
                if not event.done:
                    yield encode_chunk(event.text)
                    continue
                ended = True
                if event.error_code:
                    yield encode_chunk(event.error or "generation failed", event.error_code)
        finally:
            if not ended:
                await asyncio.to_thread(store.cancel, job_id)

    # No media type: the original answers with no Content-Type header.
    return StreamingResponse(frames(), media_type=None)
