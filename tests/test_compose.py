"""compose.yaml and the Dockerfile say only what llava-queue understands.

Every `llava-queue` command parses with the CLI's own parser, every LLAVA_QUEUE_* variable is a
settings field with a value the settings object accepts, and the health checks probe real routes.
"""

import os
import re
from pathlib import Path

import pytest
import yaml

from shared.cli import build_parser
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
_DEFAULT = re.compile(r"\$\{[A-Z0-9_]+:-([^}]*)\}")


def with_defaults(value) -> str:
    """A compose value with each ${VAR:-default} replaced by its default."""
    return _DEFAULT.sub(lambda match: match.group(1), str(value))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: with_defaults(value) for name, value in env.items()}


def test_compose_runs_redis_an_api_and_a_gpu_worker():
    assert {"redis", "api", "worker"} <= SERVICES.keys()
    redis = SERVICES["redis"]
    assert "--appendonly" in redis["command"] and "redis-data:/data" in redis["volumes"]
    assert redis["healthcheck"]["test"][-1] == "ping"
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert any(volume.startswith("model-cache:") for volume in worker["volumes"])
    assert environment(worker)["LLAVA_QUEUE_MODEL_PATH"] == "liuhaotian/llava-llama-2-13b-chat-lightning-preview"
    # --scale worker=N needs replicas that do not fight over a host port or a container name.
    assert "ports" not in worker and "container_name" not in worker
    for name in ("redis", "api", "worker"):
        assert SERVICES[name]["restart"] == "unless-stopped"
        assert "healthcheck" in SERVICES[name]
    for name in ("api", "worker"):
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", [name for name, service in SERVICES.items()
                                  if service.get("command", [None])[0] == "llava-queue"])
def test_every_llava_queue_command_parses(name):
    command = SERVICES[name]["command"]
    assert isinstance(command, list), "write commands as lists: no shell in between"
    try:
        args = build_parser().parse_args([with_defaults(part) for part in command[1:]])
    except SystemExit:
        pytest.fail(f"{name}: {command} is not a valid llava-queue command line")
    assert args.command == name  # the api service runs `llava-queue api`, the worker `llava-queue worker`


def test_api_and_worker_run_llava_queue():
    assert SERVICES["api"]["command"][:2] == ["llava-queue", "api"]
    assert SERVICES["worker"]["command"][:2] == ["llava-queue", "worker"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_variable_set_is_a_setting_with_a_valid_value(name, monkeypatch):
    env = environment(SERVICES[name])
    for variable, value in env.items():
        assert variable.startswith("LLAVA_QUEUE_"), f"{name}: {variable} is not read by llava-queue"
        field = variable.removeprefix("LLAVA_QUEUE_").lower()
        assert field in Settings.model_fields, f"{name}: {variable} is not a field of shared/settings.py"
        monkeypatch.setenv(variable, value)
    Settings()  # raises if a value does not parse as its field's type


def test_dockerfile_builds_the_targets_compose_names_and_sets_only_settings():
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
    for name in ("api", "worker"):
        assert SERVICES[name]["build"]["target"] in stages
    for variable in re.findall(r"\b(LLAVA_QUEUE_[A-Z0-9_]+)=", dockerfile):
        assert variable.removeprefix("LLAVA_QUEUE_").lower() in Settings.model_fields, variable


def test_health_checks_probe_the_readiness_endpoints():
    from api.routes.metrics import router

    api_check = " ".join(SERVICES["api"]["healthcheck"]["test"])
    path = re.search(r"http://127\.0\.0\.1:8000(/\w+)", api_check).group(1)
    assert path == "/readyz" and path in {route.path for route in router.routes}
    worker_check = " ".join(SERVICES["worker"]["healthcheck"]["test"])
    port = environment(SERVICES["worker"])["LLAVA_QUEUE_WORKER_METRICS_PORT"]
    assert f"http://127.0.0.1:{port}/readyz" in worker_check
    assert port in SERVICES["worker"]["expose"]


def interpolated(service: dict, shell: dict[str, str]) -> dict[str, str]:
    """A service's environment as compose writes it with `shell` (the shell or .env): ${VAR:-default} is VAR's
    value when set and not empty, else the default."""
    env = service.get("environment") or {}
    return {name: re.sub(r"\$\{([A-Z0-9_]+):-([^}]*)\}", lambda m: shell.get(m.group(1)) or m.group(2), str(value))
            for name, value in env.items()}


@pytest.mark.parametrize("shell", [{}, {"LLAVA_QUEUE_MODEL_PATH": "/models/llava-v1.5-13b"}])
def test_the_api_is_ready_for_the_model_the_worker_serves(shell, monkeypatch):
    """README: set LLAVA_QUEUE_MODEL_PATH in the shell or .env to serve another model. The API's /readyz (its
    health check) must then still turn ready once that worker is up, not wait for the default model for ever."""
    from shared.vqa import model_name_from_path

    worker = Settings.model_validate({name.removeprefix("LLAVA_QUEUE_").lower(): value for name, value in
                                      interpolated(SERVICES["worker"], shell).items()})
    served = worker.model_name or model_name_from_path(worker.model_path)
    for name in [name for name in os.environ if name.startswith("LLAVA_QUEUE_")]:
        monkeypatch.delenv(name)
    for name, value in interpolated(SERVICES["api"], shell).items():
        monkeypatch.setenv(name, value)
    assert Settings().default_model in (None, served)


def test_an_empty_variable_means_unset(monkeypatch):
    # `LLAVA_QUEUE_DEFAULT_MODEL=` in a .env file, or compose's ${VAR} of an unset VAR: the default, not a model
    # named "" (which no worker serves: /readyz would never be ready), nor a list that is not JSON.
    for name in ("DEFAULT_MODEL", "MODEL_PATH", "PUBLIC_URL", "API_KEY_HASHES", "CORS_ORIGINS", "WORKER_METRICS_PORT"):
        monkeypatch.setenv(f"LLAVA_QUEUE_{name}", "")
    settings = Settings()
    assert settings.default_model is None and settings.model_path is None and settings.public_url is None
    assert settings.api_key_hashes == [] and settings.cors_origins == [] and settings.worker_metrics_port == 0
