"""Static checks of the Docker files; no Docker engine is needed.

What a `docker compose up --scale producer=N` depends on is checked against the real code: the
entrypoint script is run (with a stand-in `python` that prints its argv) on each service's
environment, and every flag it produces must be one the real CLI lists in its --help. When a
`docker compose` (or v2 `docker-compose`) client is installed, `config` validates both files too.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
ZMQ_PORT = "5555"
HTTP_PORT = "8000"
# Read by compose for interpolation only; they never reach a container.
COMPOSE_ONLY_VARIABLES = {"LINEPACK_PUBLISH_HTTP", "LINEPACK_DATA_DIR"}
# CLI flags a service deliberately does not take from the environment, and why.
NOT_FROM_ENVIRONMENT = {
    "trainer": {
        "--help",
        "--bind", "--http-host", "--http-port",  # fixed in the container; set in `command`
    },
    "producer": {
        "--help",
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


@functools.lru_cache(maxsize=None)
def cli_flags(role: str) -> frozenset[str]:
    """The long option strings the real CLI of ``role`` lists in its --help."""
    result = subprocess.run([*CLI[role], "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    flags = set()
    for line in result.stdout.splitlines():
        match = re.match(r"^\s+(?:-\w[^,]*, )?(--[a-z][a-z0-9-]*)", line)
        if match:
            flags.add(match[1])
    assert "--help" in flags, result.stdout
    return frozenset(flags)


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


@pytest.mark.parametrize("role", ["trainer", "producer"])
def test_every_environment_variable_is_a_real_flag(role, compose, fake_python):
    """Set every variable a service passes on; each must turn into a flag that CLI accepts."""
    service = compose["services"][role]
    names = set(service["environment"])
    assert all(name.startswith("LINEPACK_") for name in names)
    assert not names & COMPOSE_ONLY_VARIABLES
    argv = run_entrypoint(fake_python, service["command"], {name: "true" for name in names})
    assert argv[:len(CLI[role]) - 1] == CLI[role][1:], f"{role} does not start {' '.join(CLI[role][1:])}"
    passed = {arg for arg in argv if arg.startswith("--")}
    unknown = passed - cli_flags(role)
    assert not unknown, f"{role} CLI has no {sorted(unknown)}"
    expected_from_environment = cli_flags(role) - NOT_FROM_ENVIRONMENT[role]
    from_environment = {"--" + name.removeprefix("LINEPACK_").lower().replace("_", "-") for name in names}
    assert from_environment == expected_from_environment, (
        f"{role}: flags without a variable {sorted(expected_from_environment - from_environment)}, "
        f"variables without a flag {sorted(from_environment - expected_from_environment)}")


@pytest.mark.parametrize("role", ["trainer", "producer"])
def test_default_command_parses(role, compose, fake_python):
    """The argv the container runs with compose's defaults passes the real parser's type checks."""
    service = compose["services"][role]
    argv = run_entrypoint(fake_python, service["command"], service_environment(service))
    # Options are parsed in order and --help exits when it is reached, after every value before it
    # was converted and checked; an unknown flag would only be reported after --help, hence the test above.
    result = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_entrypoint_translation(fake_python):
    argv = run_entrypoint(fake_python, ["producer", "--block-size", "64"], {
        "LINEPACK_BLOCK_SIZE": "256", "LINEPACK_SUPERVISE_SEP": "true", "LINEPACK_PACKING": "false",
        "LINEPACK_CORPUS": "", "LINEPACK_RATIO_RANGE": "0.2,0.5", "LINEPACK_STAGES": "/data/my stages.toml"})
    assert argv[:3] == ["-m", "producer", "run"]
    assert argv[3] == "--producer-id", "replicas need distinct ids by default"
    rest = argv[5:]
    assert rest == ["--block-size", "256", "--ratio-range", "0.2,0.5", "--stages", "/data/my stages.toml",
                    "--supervise-sep", "--block-size", "64"]

    assert run_entrypoint(fake_python, ["producer"], {"LINEPACK_PRODUCER_ID": "a"})[3:] == [
        "--producer-id", socket.gethostname(), "--producer-id", "a"]
    assert run_entrypoint(fake_python, ["python", "-m", "trainer.consume"], {"LINEPACK_X": "1"}) == [
        "-m", "trainer.consume"]


def test_entrypoint_resumes_only_from_an_existing_checkpoint(fake_python, tmp_path):
    from trainer.checkpoint import CHECKPOINT_NAME

    environment = {"LINEPACK_OUT_DIR": str(tmp_path), "LINEPACK_RESUME": "auto"}
    assert "--resume" not in run_entrypoint(fake_python, ["trainer"], environment)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"")
    assert "--resume" in run_entrypoint(fake_python, ["trainer"], environment)


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


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    arguments = dict(value.split("=", 1) for key, value in instructions if key == "ARG")
    assert arguments["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"

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


def test_compose_defaults_match_the_local_stack(compose):
    """`docker compose up` and `bash scripts/run.sh` train the same small CPU setup by default."""
    from trainer import stack

    def as_environment(arguments: tuple[str, ...]) -> dict[str, str]:
        pairs = zip(arguments[::2], arguments[1::2])
        return {"LINEPACK_" + flag.removeprefix("--").upper().replace("-", "_"): value for flag, value in pairs}

    producer = service_environment(compose["services"]["producer"])
    trainer = service_environment(compose["services"]["trainer"])
    for name, value in as_environment(stack.DEFAULT_PRODUCER_ARGS).items():
        assert producer[name] == value, name
    for name, value in as_environment(stack.DEFAULT_TRAINER_ARGS).items():
        assert trainer[name] == value, name
    assert trainer["LINEPACK_MAX_ITERS"] == str(stack.build_parser().get_default("max_iters"))
