"""Static checks of the Docker files; no Docker engine is needed.

What a `docker compose up --scale producer=N` depends on is checked against the real code: every
variable a service passes is a setting of its CLI (``shared.settings``), every setting can be set,
the entrypoint script is run (with a stand-in `python` that prints its argv) and the real parser
accepts the result with the service's environment. When a `docker compose` (or v2
`docker-compose`) client is installed, `config` validates both files too.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import ROOT

yaml = pytest.importorskip("yaml")

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
ZMQ_PORT = "5555"
HTTP_PORT = "8000"
# Read by compose for interpolation only; they never reach a container.
COMPOSE_ONLY_VARIABLES = {"LINEPACK_PUBLISH_HTTP", "LINEPACK_DATA_DIR"}
# Settings a service deliberately does not take from compose's environment, and why.
NOT_FROM_ENVIRONMENT = {
    "trainer": {
        "--bind", "--http-host", "--http-port",  # fixed in the container; set in `command`
    },
    "producer": {
        "--bind",            # producers connect to the trainer
        "--producer-id",     # one value for every replica would give them all the same stream
        "--max-messages",    # a producer that exits would be restarted by `restart: unless-stopped`
    },
}
CLI = {"trainer": [sys.executable, "-m", "trainer"], "producer": [sys.executable, "-m", "producer", "run"]}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def load(path: Path) -> dict:
    with path.open() as handle:
        return yaml.safe_load(handle)


def interpolate(value: str, environment: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME:-default}`` substitution, the only form these files use."""
    environment = environment or {}
    resolved = INTERPOLATION.sub(lambda m: environment.get(m["name"]) or (m["default"] or ""), value)
    assert "$" not in resolved, f"unsupported interpolation in {value!r}"
    return resolved


def service_environment(service: dict, overrides: dict[str, str] | None = None) -> dict[str, str]:
    return {name: interpolate(str(value), overrides) for name, value in service["environment"].items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory) -> Path:
    """A folder whose ``python`` prints its arguments one per line instead of running anything."""
    folder = tmp_path_factory.mktemp("fake-python")
    script = folder / "python"
    script.write_text('#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg"; done\n')
    script.chmod(0o755)
    return folder


def run_entrypoint(fake_python: Path, arguments: list[str], environment: dict[str, str]) -> list[str]:
    """The argv the entrypoint hands to ``python``, given the container's environment."""
    result = subprocess.run(
        ["bash", str(ENTRYPOINT), *arguments], capture_output=True, text=True, timeout=30,
        env={"PATH": f"{fake_python}:/usr/bin:/bin", **environment})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_services_and_scaling(compose):
    assert set(compose["services"]) == {"trainer", "producer"}
    producer = compose["services"]["producer"]
    for key in ("container_name", "ports", "hostname", "networks", "scale"):
        assert key not in producer, f"producer.{key} would stop `--scale producer=N` from working"
    assert producer["restart"] == "unless-stopped"
    assert compose["services"]["trainer"]["restart"].startswith("on-failure")


def test_ports_are_consistent(compose):
    trainer = compose["services"]["trainer"]
    command = trainer["command"]
    assert command[command.index("--bind") + 1] == f"tcp://*:{ZMQ_PORT}"
    assert command[command.index("--http-host") + 1] == "0.0.0.0"
    assert command[command.index("--http-port") + 1] == HTTP_PORT

    connect = service_environment(compose["services"]["producer"])["LINEPACK_CONNECT"]
    assert connect == f"tcp://trainer:{ZMQ_PORT}", "producers must reach the trainer service by name"

    (mapping,) = trainer["ports"]
    host_ip, host_port, container_port = interpolate(mapping).split(":")
    assert (host_ip, host_port, container_port) == ("127.0.0.1", HTTP_PORT, HTTP_PORT)
    assert interpolate(mapping, {"LINEPACK_PUBLISH_HTTP": "0.0.0.0:9000"}) == f"0.0.0.0:9000:{HTTP_PORT}"

    health = trainer["healthcheck"]["test"]
    assert health[:2] == ["CMD", "python"], "slim images have no curl"
    assert f"http://127.0.0.1:{HTTP_PORT}/healthz" in health[-1]


def test_run_directory_is_a_named_volume(compose):
    trainer = compose["services"]["trainer"]
    out_dir = service_environment(trainer)["LINEPACK_OUT_DIR"]
    volume_name, mount_point = trainer["volumes"][0].split(":")[:2]
    assert volume_name in compose["volumes"]
    assert out_dir == mount_point or out_dir.startswith(mount_point + "/")

    data_mount, keys_mount = compose["services"]["producer"]["volumes"]
    assert interpolate(data_mount).endswith(":/data:ro")
    assert interpolate(keys_mount).endswith(":/keys:ro") and interpolate(trainer["volumes"][1]) == interpolate(keys_mount)


def role_settings(role: str) -> list[type]:
    """The settings classes whose fields are the flags (and variables) of ``role``'s CLI."""
    if role == "trainer":
        from trainer.__main__ import SETTINGS

        return [cls for cls, _ in SETTINGS]
    from producer.sending import SenderSettings
    from producer.service import RunSettings
    from shared.data_config import DataConfig

    return [SenderSettings, RunSettings, DataConfig]


@pytest.mark.parametrize("role", ["trainer", "producer"])
def test_every_environment_variable_is_a_real_setting(role, compose):
    """Compose passes only variables that name a setting of the service's CLI, and every setting
    of that CLI (but those fixed by the container) can be set through compose. A corruption
    policy's own flags may be left out (a policy is added in shared/corruption.py alone): compose
    lists those of the policies it documents."""
    from shared.corruption import policy_flags
    from shared.settings import env_name, iter_settings

    service = compose["services"][role]
    names = set(service["environment"])
    assert all(name.startswith("LINEPACK_") for name in names)
    assert not names & COMPOSE_ONLY_VARIABLES
    settable = {env_name(field.name) for _, field in iter_settings(*role_settings(role))}
    assert names <= settable, f"{role}: variables that are no setting: {sorted(names - settable)}"
    expected = settable - {env_name(flag.removeprefix("--").replace("-", "_")) for flag in NOT_FROM_ENVIRONMENT[role]}
    optional = {env_name(name) for name in policy_flags()}
    assert expected - optional <= names, f"{role}: settings compose cannot set: {sorted(expected - optional - names)}"


@pytest.mark.parametrize("role", ["trainer", "producer"])
def test_compose_leaves_the_defaults_to_the_code(role, compose):
    """A variable compose passes is empty by default (the CLI's own default applies), except the
    container-specific values, so no default is copied into the compose file."""
    container_values = {"LINEPACK_OUT_DIR": "/runs", "LINEPACK_RESUME": "auto", "LINEPACK_CONNECT": f"tcp://trainer:{ZMQ_PORT}"}
    for name, value in service_environment(compose["services"][role]).items():
        assert value == container_values.get(name, ""), name


@pytest.mark.parametrize("role", ["trainer", "producer"])
def test_default_command_parses(role, compose, fake_python):
    """The argv the container runs, with compose's environment, passes the real parser (every
    variable is read and checked when the parser is built, before --help exits)."""
    service = compose["services"][role]
    environment = service_environment(service)
    argv = run_entrypoint(fake_python, service["command"], environment)
    assert argv[:len(CLI[role]) - 1] == CLI[role][1:], f"{role} does not start {' '.join(CLI[role][1:])}"
    result = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, **environment})
    assert result.returncode == 0, result.stderr
    bad = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, **environment, "LINEPACK_SEED": "minus one"})
    assert bad.returncode == 2 and "LINEPACK_SEED='minus one'" in bad.stderr


def test_entrypoint(fake_python):
    argv = run_entrypoint(fake_python, ["producer", "--block-size", "64"], {})
    assert argv == ["-m", "producer", "run", "--producer-id", socket.gethostname(), "--block-size", "64"], \
        "replicas need distinct ids by default"
    assert run_entrypoint(fake_python, ["producer"], {"LINEPACK_PRODUCER_ID": "a"}) == ["-m", "producer", "run"]
    assert run_entrypoint(fake_python, ["trainer", "--max-iters", "5"], {}) == ["-m", "trainer", "--max-iters", "5"]
    assert run_entrypoint(fake_python, ["python", "-m", "trainer.consume"], {"LINEPACK_X": "1"}) == [
        "-m", "trainer.consume"]


def test_resume_auto_resumes_only_from_an_existing_checkpoint(tmp_path):
    from trainer.loop.checkpoint import CHECKPOINT_NAME
    from trainer.loop.config import TrainConfig
    from trainer.loop.startup import checkpoint_to_resume

    path = tmp_path / CHECKPOINT_NAME
    auto = TrainConfig(out_dir=str(tmp_path), resume="auto")
    assert checkpoint_to_resume(auto, str(path), "cpu") is None
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unusable checkpoint"):  # there is one now: auto tries it
        checkpoint_to_resume(auto, str(path), "cpu")
    assert checkpoint_to_resume(TrainConfig(out_dir=str(tmp_path), resume="never"), str(path), "cpu") is None


def test_healthcheck_command_follows_healthz(compose, tmp_path):
    """Run the healthcheck's python against a local server: 0 when /healthz is 200, else not."""
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = compose["services"]["trainer"]["healthcheck"]["test"][-1]
        code = code.replace(f"127.0.0.1:{HTTP_PORT}/", f"127.0.0.1:{server.server_port}/")
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode == 0
        status["code"] = 503
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode != 0
    finally:
        server.shutdown()
        server.server_close()


def test_gpu_override():
    override = load(COMPOSE_GPU)
    trainer = override["services"]["trainer"]
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert interpolate(trainer["environment"]["LINEPACK_DEVICE"]) == "cuda"
    assert trainer["image"] != load(COMPOSE)["services"]["trainer"]["image"], "a CUDA build must not overwrite the CPU tag"
    assert set(override["services"]) == {"trainer"}, "producers never need a GPU"


def test_the_end_to_end_script_builds_its_own_image_and_removes_it():
    """The e2e (and so scripts/test.sh) builds a tag of its own, never the user's linepack:cpu, and
    removes it in its exit trap: a test run leaves no image behind."""
    for path, service in ((COMPOSE, "trainer"), (COMPOSE, "producer"), (ROOT / "docker-compose.producers.yml", "producer")):
        image = load(path)["services"][service]["image"]
        assert interpolate(image) == "linepack:cpu" and interpolate(image, {"LINEPACK_IMAGE": "mine:1"}) == "mine:1"
    script = (ROOT / "scripts" / "compose-e2e.sh").read_text()
    assert "\nexport LINEPACK_IMAGE=linepack-e2e:$PROJECT " in script
    cleanup = script.split("\ncleanup() {\n", 1)[1].split("\n}\n", 1)[0]
    assert 'docker image rm -f "$LINEPACK_IMAGE"' in cleanup and "trap cleanup EXIT" in script


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile():
    instructions = dockerfile_instructions()
    assert instructions[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    arguments = dict(value.split("=", 1) for key, value in instructions if key == "ARG")
    assert arguments["TORCH_INDEX_URL"] == "", "no index is named: a wheel in docker/wheels/, or pip's own index"
    assert ("COPY", "docker/wheels/ /tmp/wheels/") in instructions
    assert (ROOT / "docker" / "wheels" / "README.md").exists(), "the folder is in the repository, wheels or not"

    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = {}
    for key, value in instructions:
        if key == "COPY":
            *sources, destination = value.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
                assert source.split("/")[0] not in ignored, f"COPY {source}: excluded by .dockerignore"
                copied[source] = destination
    for package in ("shared", "producer", "trainer", "pyproject.toml"):
        assert package in copied
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert readme is None or readme[1] in copied, "pip install . needs the readme pyproject.toml names"

    entrypoint = next(value for key, value in instructions if key == "ENTRYPOINT")
    assert entrypoint == f'["{Path(copied["docker/entrypoint.sh"]).name}"]'
    assert copied["docker/entrypoint.sh"].startswith("/usr/local/bin/")
    assert ENTRYPOINT.stat().st_mode & 0o111, "the entrypoint must be executable (COPY keeps the mode)"
    assert ("USER", "linepack") in instructions


def compose_client() -> list[str] | None:
    """``docker compose`` or a v2 ``docker-compose``, whichever works here; None when neither."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2"):
            return command
    return None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_docker_compose_config(files):
    client = compose_client()
    if client is None:
        pytest.skip("no Docker Compose v2 client here (`docker compose version` fails); "
                    "the YAML was checked by the other tests only")
    arguments = [argument for path in files for argument in ("-f", str(path))]
    result = subprocess.run([*client, *arguments, "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
