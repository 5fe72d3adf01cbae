"""`llava-queue up`: the whole stack from one command, and Ctrl-C leaves no process behind."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from shared.redis_server import RedisServer, free_port


def test_up_serves_and_ctrl_c_stops_every_child(default_model_dir, tmp_path):
    port = free_port()
    env = dict(os.environ, LLAVA_QUEUE_MAX_NUM_SEQS="4")
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--port", str(port), "--model-path",
                           str(default_model_dir), "--redis-dir", str(tmp_path / "redis")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "llava-queue up exited:\n" + "".join(lines)
            lines.append(line)
            if "llava-queue is up" in line:
                break
        assert f"http://127.0.0.1:{port}" in lines[-1]
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        assert "worker" in names and "api" in names and ("valkey-server" in names or "redis-server" in names)
        job = requests.post(f"http://127.0.0.1:{port}/v1/jobs", json={"prompt": "Hello", "max_new_tokens": 4},
                            timeout=10)
        assert job.status_code == 202
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [child.cmdline() for child in alive]
        assert (tmp_path / "redis" / "appendonlydir").is_dir()  # the jobs outlive the stack
    finally:
        if up.poll() is None:
            up.kill()


def test_two_embedded_redis_servers_cannot_share_a_data_folder(tmp_path):
    with RedisServer(data_dir=tmp_path):
        with pytest.raises(RuntimeError, match="in use by another embedded Redis"):
            RedisServer(data_dir=tmp_path).start()
        up = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--redis-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
        assert up.returncode == 2 and "--ephemeral-redis" in up.stderr
    with RedisServer(data_dir=tmp_path):  # free again once the first one stopped
        pass
