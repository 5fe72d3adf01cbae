"""At LLAVA_QUEUE_LOG_LEVEL=DEBUG the `websockets` library logs a WebSocket's handshake, header by header: a client
that sent its key in an Authorization header (as the openai package and the docs' examples do) had it written to the
API's log in clear ("< authorization: Bearer <key>"). Authorization headers are masked there as `?api_key=` is."""

import asyncio

import websockets

from api.auth import key_digest
from conftest import run_stack
from shared.redis_server import RedisServer

KEY = "key-s40-secret-4321"


def test_a_websockets_authorization_header_is_not_logged_at_debug():
    env = {"LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}"]', "LLAVA_QUEUE_LOG_LEVEL": "DEBUG"}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-logs40-") as stack:
        async def connect():
            async with websockets.connect(f"{stack.ws_url}/v1/ws",
                                          additional_headers={"Authorization": f"Bearer {KEY}"}) as socket:
                await socket.send('{}')  # refused at once (error_code 4), then closed
                await asyncio.wait_for(socket.recv(), 10)

        asyncio.run(connect())
        log = (stack.log_dir / "api.log").read_text()
        # The handshake was logged, its header masked.
        assert "authorization: Bearer ***" in log.lower().replace("bearer", "Bearer"), log[-3000:]
        assert KEY not in log
