"""Serving and the clients stand without PyTorch: the gateway, the converter and the client commands
start in a fresh interpreter without loading torch, torchvision or onnx (the clients without ONNX
Runtime, the Triton client or matplotlib either); no module of `serving` or `clients` imports
`training`; the contract package `parsimony` imports only the standard library, numpy and pydantic
at module level; and every third-party module that `serving`, `clients` and `training` import comes
with their extra of pyproject.toml (`serve`, `client`, `train`), so `pip install '.[serve]'`,
`'.[client]'` or `'.[train]'` is enough (training.demo, which runs all three, needs them all).
tests/test_extras_install.py installs those extras into empty venvs and runs the commands there."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from benchmarks.footprint import probe_module

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"parsimony", "training", "serving", "clients"}
HEAVY = {"torch", "torchvision", "onnx"}  # never in a serving or client process
CLIENT_HEAVY = HEAVY | {"onnxruntime", "tritonclient", "matplotlib"}  # not installed with '.[client]'
CONTRACT_DEPS = {"numpy", "pydantic"}
CONTRACT_LAZY = {"onnx", "onnxruntime"}  # imported inside the functions that need them, never at the top
ALL_ROLES = {"training/demo.py"}  # runs training, serving and a client: needs every extra (the dev install)

COMMANDS = [  # (module, what must not be loaded)
    ("serving.server", HEAVY),
    ("serving.convert", HEAVY),
    ("clients.predict", CLIENT_HEAVY),
    ("clients.load", CLIENT_HEAVY),
]


def loaded(modules: list[str], banned: set[str]) -> list[str]:
    """The top-level packages of ``banned`` that appear in ``modules``."""
    return sorted({m.split(".")[0] for m in modules} & banned)


@pytest.mark.parametrize(("module", "banned"), COMMANDS, ids=[m for m, _ in COMMANDS])
def test_the_command_starts_without_pytorch(module, banned):
    got = probe_module(sys.executable, module, "--help", cwd=ROOT)
    assert got["exit"] == 0, got["stderr"][-3000:]
    # the command itself answered (so an empty list below means something)
    assert got["stdout"].startswith(f"usage: python -m {module}"), got["stdout"][:500]
    assert loaded(got["modules"], banned) == [], f"python -m {module} --help loaded {loaded(got['modules'], banned)}"
    assert "training" not in {m.split(".")[0] for m in got["modules"]}, f"python -m {module} imported training"


def test_the_gateway_and_the_client_libraries_import_without_pytorch():
    """Importing the gateway's entry point, the repository reader and both client commands together
    loads neither torch nor training (a program embedding them stays small)."""
    code = ("import json, sys, serving.server.__main__, serving.repository, serving.convert, clients, "
            "clients.predict, clients.load; print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.splitlines()[-1])
    assert "serving.server.__main__" in modules and "clients.load" in modules
    assert loaded(modules, HEAVY | {"training"}) == []


# --- static checks: what each package imports ------------------------------------------------------------


def python_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def imports(path: Path, *, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in a file; with ``top_level_only``, only those that run when the
    module is imported (not inside a function, nor under ``if TYPE_CHECKING:``). A relative import
    is named by its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if not top_level_only:
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    else:
        nodes, todo = [], list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.Import | ast.ImportFrom):
                nodes.append(node)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                todo += node.orelse
            elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                todo += [c for c in ast.iter_child_nodes(node)
                         if isinstance(c, ast.stmt | ast.excepthandler | ast.match_case)]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        else:
            found.append((node.lineno, package if node.level else node.module))
    return sorted(found)


def third_party(module: str) -> str | None:
    top = module.split(".")[0]
    return None if not top or top in FIRST_PARTY or top in sys.stdlib_module_names else top


def test_training_imports_serving_and_the_clients_only_in_the_demo():
    """`pip install '.[train]'` runs training.run, .sweep, .compact and .export without the gateway's
    or the clients' packages; only training.demo, which runs all three roles, imports them."""
    offenders = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in python_files("training") for line, m in imports(p)
                 if m.split(".")[0] in {"serving", "clients"} and p.relative_to(ROOT).as_posix() not in ALL_ROLES]
    assert offenders == [], "training imports serving or clients:\n" + "\n".join(offenders)


@pytest.mark.parametrize("package", ["serving", "clients"])
def test_serving_and_the_clients_never_import_training(package):
    offenders = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in python_files(package) for line, m in imports(p)
                 if m.split(".")[0] == "training"]
    assert offenders == [], f"{package} must not import training (move what it needs to parsimony/):\n" + \
        "\n".join(offenders)


def outside(module: str, allowed: set[str]) -> bool:
    """Whether ``module`` is another first-party package, or third-party and not in ``allowed``."""
    top = module.split(".")[0]
    return top in FIRST_PARTY - {"parsimony"} or third_party(module) not in {None, *allowed}


def test_the_contract_imports_only_the_standard_library_numpy_and_pydantic():
    files = python_files("parsimony")
    assert ROOT / "parsimony" / "manifest.py" in files
    at_import = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in files
                 for line, m in imports(p, top_level_only=True) if outside(m, CONTRACT_DEPS)]
    assert at_import == [], "parsimony/ imports at module level more than the standard library, numpy and " \
        "pydantic (import onnx or onnxruntime inside the function that needs them):\n" + "\n".join(at_import)
    anywhere = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in files
                for line, m in imports(p) if outside(m, CONTRACT_DEPS | CONTRACT_LAZY)]
    assert anywhere == [], "parsimony/ imports training, serving or clients, or a package that neither the " \
        "serve nor the train extra installs:\n" + "\n".join(anywhere)


def test_the_clients_never_import_what_the_client_extra_leaves_out():
    offenders = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in python_files("clients") for line, m in imports(p)
                 if m.split(".")[0] in CLIENT_HEAVY]
    assert offenders == [], "the client extra installs none of " + ", ".join(sorted(CLIENT_HEAVY)) + ":\n" + \
        "\n".join(offenders)


# --- every import of serving/ and clients/ is installed by its extra ---------------------------------------

# imports that the extra deliberately does not bring, each with where it comes from instead
SUPPLIED_ELSEWHERE = {
    ("serving/python_backend/model.py", "triton_python_backend_utils"): "Triton's python backend stub",
    ("serving/proto/generate.py", "grpc_tools"): "the dev extra (make proto)",
    ("serving/tensorrt_build.py", "tensorrt"): "the tensorrt extra, on a GPU host",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(extras: set[str]) -> list[str]:
    """parsimony's own requirements with ``extras``, read from pyproject.toml (not from the installed
    metadata, which is as old as the last `pip install -e`)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


@cache
def extra_closure(extra: str) -> frozenset[str]:
    """The distributions ``pip install '.[extra]'`` installs, resolved through the installed packages'
    metadata (a self-reference such as ``parsimony[train]`` is followed through pyproject.toml)."""
    from packaging.requirements import Requirement

    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [("parsimony", frozenset({extra}))]
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in seen:
            continue
        seen.add((canonical(name), extras))
        if canonical(name) == "parsimony":
            reqs = project_requirements(set(extras))
        else:
            try:
                reqs = md.requires(name) or []
            except md.PackageNotFoundError:
                continue  # not installed here (tensorrt): nothing below it to follow
        for text in reqs:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return frozenset(name for name, _ in seen)


@pytest.mark.parametrize(("package", "extra"), [("serving", "serve"), ("clients", "client"), ("training", "train")])
def test_every_third_party_import_comes_with_the_extra(package, extra):
    provided = extra_closure(extra)
    distributions = md.packages_distributions()
    missing = []
    for path in python_files(package):
        rel = path.relative_to(ROOT).as_posix()
        for line, module in imports(path):
            top = third_party(module)
            if top is None or (rel, top) in SUPPLIED_ELSEWHERE or rel in ALL_ROLES:
                continue
            if not {canonical(d) for d in distributions.get(top, [top])} & provided:
                missing.append(f"{rel}:{line}: {module} ({', '.join(distributions.get(top, ['not installed']))})")
    assert missing == [], f"{package}/ imports what pip install '.[{extra}]' does not install; add it to the " \
        f"{extra} extra in pyproject.toml:\n" + "\n".join(missing)


def test_the_extras_match_their_roles():
    """The base install is the contract; only train brings PyTorch; client brings neither ONNX Runtime
    nor the Triton client; dev is every role plus the test tools."""
    from packaging.requirements import Requirement

    assert {canonical(Requirement(r).name) for r in project_requirements(set())} == {"numpy", "pydantic"}
    serve, client, train = extra_closure("serve"), extra_closure("client"), extra_closure("train")
    assert {"torch", "torchvision", "onnx", "onnxruntime"} <= train
    assert {"onnxruntime", "onnx", "grpcio", "fastapi", "uvicorn", "tritonclient"} <= serve
    assert not {"torch", "torchvision", "matplotlib"} & serve
    assert {"grpcio", "httpx", "pillow", "numpy"} <= client
    assert not {"torch", "torchvision", "onnx", "onnxruntime", "tritonclient", "matplotlib"} & client
    assert extra_closure("dev") >= serve | client | train
