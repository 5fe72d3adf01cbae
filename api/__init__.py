"""The HTTP/WebSocket API: FastAPI routes, the streaming gateway. Never imports torch."""
