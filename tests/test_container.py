"""The container without a Docker engine: hadolint on the Dockerfile, the manifests against the
Kubernetes schemas, and the Dockerfile's own install and start steps run outside Docker."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from server.embedded_redis import free_port
from tests.processes import log_lines_until, reaped, terminate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MANIFESTS = sorted(str(p) for p in (ROOT / "deploy" / "k8s").glob("*.yaml"))


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


@pytest.mark.parametrize("version", ["1.27.0", "1.37.0"])  # 1.27: the first with GA gRPC probes
def test_manifests_are_valid_against_the_kubernetes_schemas(version: str) -> None:
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", version, *MANIFESTS],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(MANIFESTS) == 3
    assert result.stdout.count("passed") == 3, result.stdout


def test_the_validator_rejects_a_manifest_with_a_mistake(tmp_path: Path) -> None:
    broken = (
        (ROOT / "deploy" / "k8s" / "deployment.yaml").read_text().replace("readinessProbe", "readynessProbe")
    )
    (tmp_path / "broken.yaml").write_text(broken)
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", str(tmp_path / "broken.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0, "a strict validator must catch an unknown field"


def test_the_deployment_gives_shutdown_more_time_than_the_grace_and_probes_over_grpc() -> None:
    documents = {
        doc["kind"]: doc for path in MANIFESTS for doc in yaml.safe_load_all(Path(path).read_text()) if doc
    }
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= set(documents)
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] > float(env["CACHEASIDE_SHUTDOWN_GRACE_S"])
    probes = next(port["containerPort"] for port in container["ports"] if port["name"] == "probes")
    assert container["readinessProbe"]["grpc"] == {"port": probes, "service": "cacheaside.v1.CacheService"}
    assert container["livenessProbe"]["grpc"]["port"] == probes
    assert pod["securityContext"]["runAsNonRoot"] is True
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert {"redis", "postgres", "cacheaside"} <= set(compose["services"])


@dataclass
class Stage:
    """One FROM ... of a Dockerfile and its instructions, as (keyword, argument text)."""

    name: str
    steps: list[tuple[str, str]] = field(default_factory=list)


def _stages(dockerfile: str) -> list[Stage]:
    stages: list[Stage] = []
    logical = dockerfile.replace("\\\n", " ")
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = argument.split()
            stages.append(Stage(words[2] if len(words) > 2 and words[1].upper() == "AS" else ""))
        else:
            stages[-1].steps.append((keyword, argument.strip()))
    return stages


def _env(argument: str, env: dict[str, str], root: Path) -> dict[str, str]:
    # ENV a=b c=d, with $VAR expanded; absolute paths are moved under root, the stand-in for /.
    found = {}
    for word in shlex.split(argument):
        name, _, value = word.partition("=")
        parts = [str(root) + part if part.startswith("/") else part for part in value.split(":")]
        found[name] = os.path.expandvars(":".join(parts).replace("$PATH", env.get("PATH", "")))
    return found


def _command(argument: str) -> list[str]:
    assert argument.startswith("["), f"exec form only, so signals reach the process: {argument}"
    return list(json.loads(argument))


async def test_the_dockerfile_install_and_start_steps_work_outside_docker(
    tmp_path: Path, redis_url: str
) -> None:
    build, run = _stages((ROOT / "Dockerfile").read_text())
    assert build.name == "build"
    root = tmp_path / "root"  # stands in for the image's /
    python_bin = tmp_path / "python-bin"  # the image's `python`: this interpreter's base
    python_bin.mkdir()
    (python_bin / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {"PATH": f"{python_bin}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    workdir = root

    for keyword, argument in build.steps:
        if keyword == "ENV":
            env.update(_env(argument, env, root))
        elif keyword == "WORKDIR":
            workdir = root / argument.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, target = argument.split()
            destination = workdir / target
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(path, destination / path.name if target.endswith("/") else destination)
        elif keyword == "RUN":
            run_step = ["bash", "-euc", argument]
            await asyncio.to_thread(subprocess.run, run_step, cwd=workdir, env=env, check=True, timeout=300)

    run_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    command = health = None
    for keyword, argument in run.steps:
        if keyword == "ENV":
            run_env.update(_env(argument, run_env, root))
        elif keyword == "COPY":
            source, target = argument.removeprefix("--from=build ").split()
            assert source == target, "the virtualenv keeps its path: its scripts name their interpreter"
        elif keyword == "USER":
            assert not argument.startswith(("0", "root")), "the service runs without privileges"
        elif keyword == "HEALTHCHECK":
            health = _command(argument[argument.index("CMD") + 3 :].strip())
        elif keyword == "CMD":
            command = _command(argument)
        # RUN useradd changes the machine's users: only Docker may run it.
    assert command == ["cacheaside", "serve"]
    assert health is not None
    assert health[0] == "cacheaside"

    port, probe_port = free_port(), free_port()
    assert {"CACHEASIDE_HEALTH_LISTEN", "CACHEASIDE_HEALTH_TARGET"} <= set(run_env), "the image probes apart"
    run_env.update(
        {
            "CACHEASIDE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/container.db",
            "CACHEASIDE_REDIS_URL": redis_url,
            "CACHEASIDE_KEY_PREFIX": f"container-{port}",
            "CACHEASIDE_LISTEN": f"127.0.0.1:{port}",
            "CACHEASIDE_TARGET": f"127.0.0.1:{port}",
            "CACHEASIDE_HEALTH_LISTEN": f"127.0.0.1:{probe_port}",
            "CACHEASIDE_HEALTH_TARGET": f"127.0.0.1:{probe_port}",
            "CACHEASIDE_METRICS_LISTEN": "127.0.0.1:0",
        }
    )
    elsewhere = tmp_path / "cwd"  # not the checkout: the installed package must stand alone
    elsewhere.mkdir()
    located = await asyncio.to_thread(
        subprocess.run,
        ["python", "-c", "import server; print(server.__file__)"],
        cwd=elsewhere,
        env=run_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert located.stdout.startswith(str(root / "opt" / "venv")), located.stdout
    # What the compose file's migrate service and the Deployment's init container run.
    upgrade = ["cacheaside", "db", "upgrade"]
    await asyncio.to_thread(subprocess.run, upgrade, cwd=elsewhere, env=run_env, check=True, timeout=120)

    server = await asyncio.create_subprocess_exec(
        *command, cwd=elsewhere, env=run_env, stderr=asyncio.subprocess.PIPE
    )
    async with reaped(server):
        await log_lines_until(server, "cacheaside serving")
        probe = await asyncio.create_subprocess_exec(
            *health, cwd=elsewhere, env=run_env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await probe.communicate()
        assert (probe.returncode, out.decode().strip()) == (0, "SERVING")
        assert await terminate(server) == 0
