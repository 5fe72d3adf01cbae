"""The README as a new user reads it: every setting and every route it lists is the code's, with the default it
states, and `llava-queue up` listens where the settings say, as `llava-queue api` does."""

import importlib
import os
import pkgutil
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

import api.routes
from shared.redis_server import free_port
from shared.settings import OTHER_VARIABLES, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Defaults the table words, where the field's own default is None (worked out when a worker starts).
WORDED_DEFAULTS = {"max_prefill_tokens": "`256` on a CPU, `4096` on a GPU",
                   "batch_reserved_slots": "`MAX_NUM_SEQS` / 8"}


def settings_table() -> dict[str, str]:
    """The README's Settings table: each variable (without its prefix) and the default it states."""
    section = README[README.index("### Settings"):README.index("## Layout")]
    table = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        names_cell, default_cell = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = re.findall(r"`([A-Z0-9_]+)`", names_cell)
        # "`HOST`, `PORT`" with "`127.0.0.1`, `8000`": one default each; "`LOAD_8BIT`, `LOAD_4BIT`": one for both.
        defaults = default_cell.split(", ") if len(names) > 1 and default_cell.count("`, `") else [default_cell] * 2
        table.update(zip(names, defaults))
    return table


def written(name: str, default) -> str:
    """A field's default as the table writes it."""
    if name in WORDED_DEFAULTS:
        return WORDED_DEFAULTS[name]
    if default is None:
        return "unset"
    if default == "":
        return "empty"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, Path):
        return f"`{str(default).replace(str(Path.home()), '~', 1)}`"
    return f"`{default}`"


def test_every_setting_is_in_the_readme_table_with_its_default():
    table = settings_table()
    fields = Settings.model_fields
    assert sorted(set(table) - {name.upper() for name in fields}) == [], "the README lists settings that do not exist"
    for name, field in fields.items():
        assert name.upper() in table, f"LLAVA_QUEUE_{name.upper()} is not in the README's Settings table"
        default = field.get_default(call_default_factory=True)
        stated = table[name.upper()]
        if isinstance(default, (int, float)) and not isinstance(default, bool) and stated.strip("`").replace(
                ".", "", 1).isdigit():
            assert float(stated.strip("`")) == default, f"{name.upper()}: the README says {stated}, it is {default}"
        elif default == [] and stated in ("`[]`", "empty"):
            continue
        else:
            assert stated == written(name, default), f"{name.upper()}: the README says {stated}, it is {default!r}"
    for variable in OTHER_VARIABLES:
        assert variable in README, f"{variable} (read by llava-queue, no setting) is not in the README"


def test_every_route_of_the_api_is_in_the_readme():
    # Path parameters by any name ({id} in the README, {job_id} in the code); each path as the README writes it:
    # in code, alone or after its method.
    readme = re.sub(r"\{[^}]*\}", "{}", README)
    missing = []
    for module in pkgutil.iter_modules(api.routes.__path__):
        for route in importlib.import_module(f"api.routes.{module.name}").router.routes:
            path = re.sub(r"\{[^}]*\}", "{}", route.path)
            methods = getattr(route, "methods", None) or {"WS"}
            if not any(f"`{method} {path}" in readme for method in methods) and f"`{path}`" not in readme:
                missing.append(f"{'/'.join(sorted(methods))} {route.path}")
    assert missing == [], f"routes the README does not name: {missing}"


def up(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`llava-queue up` against a Redis that is not there: it stops at its start checks, before anything starts."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLAVA_QUEUE_")}, **env}
    return subprocess.run([sys.executable, "-m", "shared.cli", "up", "--redis-url",
                           f"redis://127.0.0.1:{free_port()}/0", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_up_listens_on_llava_queue_port_as_the_api_does():
    # `LLAVA_QUEUE_PORT=9000 bash scripts/up.sh`: the port is `up`'s too (it came up on 8000). A port in use shows
    # which port `up` means to take, before it starts anything.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = up({"LLAVA_QUEUE_PORT": str(port)})
        assert run.returncode == 2, run.stderr
        assert f"127.0.0.1:{port} is in use by another process" in run.stderr
        # --port still wins over the variable.
        run = up({"LLAVA_QUEUE_PORT": str(port)}, "--port", str(free_port()))
        assert run.returncode == 2 and "is in use" not in run.stderr and "does not answer" in run.stderr, run.stderr


def test_up_with_llava_queue_port_0_says_it_needs_a_fixed_port():
    run = up({"LLAVA_QUEUE_PORT": "0"})
    assert run.returncode == 2
    assert "LLAVA_QUEUE_PORT=0" in run.stderr and "needs a fixed one" in run.stderr, run.stderr


def test_up_serves_on_llava_queue_port(default_model_dir):
    port = free_port()
    env = {**os.environ, "LLAVA_QUEUE_PORT": str(port)}
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--model-path", str(default_model_dir),
                           "--ephemeral-redis"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not lines or "llava-queue is up" not in lines[-1]:
            lines.append(up.stdout.readline())
            assert lines[-1] and time.monotonic() < deadline, "llava-queue up did not come up:\n" + "".join(lines)
        assert f"API http://127.0.0.1:{port} " in lines[-1]
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["status"] == "ready"
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
