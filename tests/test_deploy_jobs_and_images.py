"""deploy/: the distributed training job's command (run with a recording torchrun and read back with
torchrun's and training.run's own parsers), the Dockerfiles (pinned bases, stages, users, what they
copy), and the README's deployment guide (the paths it names exist, the values to edit are marked).

No Docker engine runs on the project's machines, so the images are checked as files, not built.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from deploy_support import DEPLOY, DOCKER, ROOT, TRAINING, container, one, pod_templates, render
from torch.distributed.run import get_args_parser as torchrun_parser

from training.run import build_parser as training_parser

IMAGES = ("gateway", "trainer", "engine-builder", "models")


# --- the PyTorchJob -------------------------------------------------------------------------------------


def pytorchjob() -> dict:
    return one(render(TRAINING), "PyTorchJob", "train-scenes")


def run_entrypoint(tmp_path: Path, role_rank: int) -> list[str]:
    """The pod command with the operator's variables for node ``role_rank``; returns torchrun's argv."""
    pod = container(_master_only(pytorchjob()), "pytorch")
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    env = {e["name"]: e["value"] for e in pod["env"]}
    env.update(RUNS=str(tmp_path / "runs"), RANK=str(role_rank), MASTER_ADDR="train-scenes-master-0",
               MASTER_PORT="23456", WORLD_SIZE="2", ARGS_FILE=str(tmp_path / "args"),
               PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run([*pod["command"], *pod["args"]], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return (tmp_path / "args").read_text().splitlines()


def _master_only(job: dict) -> dict:
    return {**job["spec"]["pytorchReplicaSpecs"]["Master"]["template"], "kind": "Pod", "metadata": {"name": "m"}}


def test_training_job_starts_torchrun_on_every_pod_with_its_node_rank(tmp_path):
    job = pytorchjob()
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs["Master"]["template"] == specs["Worker"]["template"]  # one pod template (a YAML anchor)
    nodes = sum(s["replicas"] for s in specs.values())
    pod = container(_master_only(job), "pytorch")
    gpus = pod["resources"]["limits"]["nvidia.com/gpu"]
    assert {p["name"]: p["containerPort"] for p in pod["ports"]} == {"pytorchjob-port": 23456}  # operator defaults

    for rank in range(nodes):
        argv = run_entrypoint(tmp_path, rank)
        args = torchrun_parser().parse_args(argv)
        assert (args.nnodes, int(args.nproc_per_node), args.node_rank) == (str(nodes), gpus, rank)
        assert (args.master_addr, args.master_port) == ("train-scenes-master-0", 23456)
        assert args.module and args.training_script == "training.run"
        train = training_parser().parse_args(args.training_script_args)
        assert train.out == str(tmp_path / "runs" / "scenes") and train.resume is None
        assert (ROOT / train.config).is_file()  # configs/ is copied to the image's working directory

    # a restarted job continues the run from its last checkpoint on the shared volume
    (tmp_path / "runs" / "scenes").mkdir(parents=True)
    (tmp_path / "runs" / "scenes" / "checkpoint-last.pt").write_bytes(b"")
    resumed = training_parser().parse_args(torchrun_parser().parse_args(run_entrypoint(tmp_path, 1)).training_script_args)
    assert resumed.resume == str(tmp_path / "runs" / "scenes") and resumed.config is None


def test_training_pods_mount_the_runs_volume_shared_memory_and_scratch():
    job = pytorchjob()
    claim = one(render(TRAINING), "PersistentVolumeClaim", "training-runs")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, template in pod_templates(job):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/runs"]]["persistentVolumeClaim"]["claimName"] == "training-runs", where
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
        assert env["RUNS"] == "/runs"


# --- Dockerfiles ----------------------------------------------------------------------------------------


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / f"{name}.Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def runtime_stage(name: str) -> dict[str, str]:
    """The last stage's instructions (a later one of the same kind wins, as COPY lines are not needed here)."""
    steps = instructions(name)
    last_from = max(i for i, (kind, _) in enumerate(steps) if kind == "FROM")
    return dict(steps[last_from:])


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_pins_its_bases_runs_as_non_root_and_copies_what_exists(name):
    steps = instructions(name)
    assert (DOCKER / f"{name}.Dockerfile").read_text().startswith("# syntax=docker/dockerfile:1")
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a and a.split("=")[0].endswith("_IMAGE"))
    froms = [a.split()[0] for kind, a in steps if kind == "FROM"]
    for base in froms:
        image = args.get(base.strip("${}"), base) if base.startswith("$") else base
        assert re.fullmatch(r"[\w./-]+:\d+(\.\d+)+[\w.-]*", image), f"{name}: base {image} is not pinned to a version"
    if name != "models":
        assert len(froms) == 2, f"{name}: a build stage and a runtime stage"
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1] == "10001:10001", f"{name}: the image must end as the unprivileged user"
    ignored = dockerignore()
    for kind, arg in steps:
        if kind == "COPY" and "--from" not in arg:
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists() or source in {"model_repository"}, f"{name}: COPY {source}"
                assert source.split("/")[0] not in ignored, f"{name}: COPY {source} is excluded by .dockerignore"


def test_dockerignore_keeps_environments_and_runs_out_of_the_build_context():
    ignored = set(dockerignore())
    assert {".git", ".venv", "runs", "**/__pycache__"} <= ignored
    assert not ignored & {"training", "serving", "configs", "model_repository", "pyproject.toml", "README.md"}


def test_gateway_image_exposes_the_servers_default_ports_with_a_health_check():
    from serving.server.config import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT

    gateway = runtime_stage("gateway")
    assert gateway["EXPOSE"].split() == [str(DEFAULT_GRPC_PORT), str(DEFAULT_HTTP_PORT)]
    assert f"http://127.0.0.1:{DEFAULT_HTTP_PORT}/healthz" in gateway["HEALTHCHECK"]
    assert gateway["ENTRYPOINT"] == '["python", "-m", "serving.server"]'
    assert runtime_stage("trainer")["ENTRYPOINT"] == '["torchrun"]'
    assert ("COPY", "configs /app/configs") in instructions("trainer")


def test_torch_pin_of_the_images_follows_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_SPEC \?= (.+)$", makefile, re.M).group(1).strip()
    for name in ("trainer",):
        assert f'ARG TORCH_SPEC="{pin}"' in (DOCKER / f"{name}.Dockerfile").read_text(), name


@pytest.mark.parametrize(("name", "extra"), [("gateway", "serve"), ("engine-builder", "serve"), ("trainer", "train")])
def test_each_image_installs_its_roles_extra_and_only_the_serving_ones_go_without_torch(name, extra):
    steps = instructions(name)
    runs = " ".join(arg for kind, arg in steps if kind == "RUN")
    assert f"'.[{extra}]'" in runs and f"'parsimony[{extra}]'" in runs, f"{name}: installs the {extra} extra"
    if extra == "serve":
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert "TORCH" not in text and "torch" not in runs, f"{name}: the serving images install no PyTorch"
        assert ("COPY", "training training") not in steps, f"{name}: the serving images hold no training code"


# --- the README's guide ---------------------------------------------------------------------------------


def deployment_guide() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Deploying on Kubernetes\n(.*?)(?=^## )", readme, re.M | re.S)
    assert match, "README.md has no '## Deploying on Kubernetes' section"
    return match.group(1)


def test_readme_guide_names_existing_paths_and_every_value_to_edit():
    guide = deployment_guide()
    paths = set(re.findall(r"(?<![\w/.-])((?:deploy|configs)/[\w./-]*\w)", guide))
    assert len(paths) > 8
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"the guide names paths that do not exist: {missing}"
    edited = sorted(str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml"}
                    and "# EDIT" in p.read_text())
    assert edited, "the values to edit are marked '# EDIT' in the manifests"
    for path in edited:
        assert path in guide, f"{path} holds a value to edit ('# EDIT') that the guide does not mention"
