"""Review of this session's worker, engine and batch-intake changes: what a user meets at their edges."""

import requests

from conftest import run_stack
from shared.protocol import MAX_PROMPT_CHARS
from shared.redis_server import RedisServer
from test_batches import jsonl, peak_memory_kib

MODEL = "SmolLM2-135M-Instruct"


def test_an_openai_batch_file_of_long_chats_is_read_in_bounded_memory(tmp_path, default_model_dir):
    # A chunk of lines ends once its jobs hold CHUNK_BYTES of "images and prompts", but an OpenAI line's prompt is its
    # turns' text, which was not counted: 500 lines of MAX_PROMPT_CHARS each made one chunk of 200 MB, held in the
    # API's memory twice over (the jobs, then the pipeline writing them). 300 lines here: 117 MB of text, which grew
    # the API by 450 MiB; a chunk of 16 MiB, by about 100 MiB.
    text = "Summarise this. " * ((MAX_PROMPT_CHARS - 10_000) // 16)
    lines = [{"custom_id": f"chat-{index}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": f"{index} {text}"}]}}
             for index in range(300)]
    (tmp_path / "chats.jsonl").write_bytes(jsonl(lines))
    env = {"LLAVA_QUEUE_DATA_ROOTS": str(tmp_path), "LLAVA_QUEUE_MODEL_PATH": str(default_model_dir)}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-chats-") as stack:
        before = peak_memory_kib(stack.processes["api"].pid)
        response = requests.post(f"{stack.base_url}/v1/batches", timeout=300, json={"input_path": "chats.jsonl"})
        grown_mib = (peak_memory_kib(stack.processes["api"].pid) - before) / 1024
        assert response.status_code == 200, response.text
        batch = response.json()
        requests.post(f"{stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=60)
        assert batch["errors"] is None and batch["request_counts"]["total"] == 300, batch
        assert grown_mib < 200, grown_mib
