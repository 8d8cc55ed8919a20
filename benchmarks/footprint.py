"""What each role installs, and what the gateway costs to start, before and after PyTorch left it.

    python -m benchmarks.footprint --before 3115934                # ~5 min with a warm pip cache
    python -m benchmarks.footprint --before 3115934 --run runs/demo --repeats 7 --torch-wheel TORCH_CPU.whl

1. **Installed size**: fresh venvs with ``pip install '.[serve]'`` and ``'.[client]'`` of the
   working tree (built as a wheel, installed as a user would), the full install (``--full-venv``,
   what `make venv` installs: every extra, the test tools, PyTorch's CUDA build) and an empty venv
   for reference: disk usage of each site-packages folder (as ``du`` counts it) and its
   distributions. With ``--torch-wheel`` (a CPU build of torch) also what the gateway image
   installed at ``--before``: that revision's package with CPU torch.
2. **The gateway and the converter**, ``--repeats`` rounds, each way in turn; *before* is the code
   at git revision ``--before`` (a worktree) run with the full venv, *after* is the working tree's
   wheel run from the serve venv, in a folder outside the repository. Measured: for
   ``python -m serving.server --run RUN``, seconds from process start until ``/readyz`` answers
   200, resident memory then, and the peak resident memory (``VmHWM``) after ``--requests``
   predictions over HTTP; for ``python -m serving.convert RUN`` into an empty repository, its wall
   time and peak resident memory. A warm-up round is left out (compiled bytecode, page cache).

Without ``--run`` a small model (tiny encoder, 64x96, three tasks) is trained with the *before*
code, so both read it. Results: ``OUT/footprint.json`` and ``OUT/footprint.md`` (the tables for
docs/BENCHMARKS.md). `build_wheel` and `role_venv` are also what tests/test_extras_install.py uses.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from benchmarks.soak import demo_image, free_port, wait_http_ready

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "parsimony", "training", "serving", "clients")
MB = 1024 * 1024


# --- installs ---------------------------------------------------------------------------------------------


def build_wheel(tree: Path, dest: Path, python: str = sys.executable) -> Path:
    """The wheel of the package in ``tree`` (a copy of its sources is built, so the tree gets no
    build/ or egg-info), written to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="parsimony-src-") as tmp:
        for name in SOURCES:
            src = Path(tree) / name
            if src.is_dir():
                shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, Path(tmp) / name)
        before = set(dest.glob("*.whl"))
        subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(dest), tmp], check=True)
    built = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("parsimony-*.whl"))
    return built[-1]


def role_venv(path: Path, *installs: list[str], python: str = sys.executable) -> Path:
    """A fresh venv at ``path`` (removed first) with each of ``installs`` (pip install arguments) run in
    turn; returns its python. ``python`` may be a venv's: the new one is made from the base interpreter."""
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(path)], check=True)
    venv_python = path / "bin" / "python"
    for args in installs:
        done = subprocess.run([str(venv_python), "-m", "pip", "install", "--quiet", *args], capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"pip install {' '.join(args)} into {path} failed:\n{done.stdout[-2000:]}"
                               f"{done.stderr[-4000:]}")
    return venv_python


def site_packages(python: Path | str) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def disk_usage(path: Path) -> int:
    """Bytes of disk ``path`` takes, counted as ``du`` does (allocated blocks, each inode once)."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def installed(python: Path | str) -> list[str]:
    """The distributions installed in ``python``'s environment, by name."""
    code = "import importlib.metadata as m, json; print(json.dumps(sorted({d.metadata['Name'] for d in m.distributions()})))"
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def sizes(venvs: dict[str, Path]) -> list[dict]:
    rows = []
    for name, python in venvs.items():
        folder = site_packages(python)
        dists = installed(python)
        rows.append({"install": name, "site_packages": str(folder), "bytes": disk_usage(folder),
                     "distributions": len(dists), "torch": "torch" in {d.lower() for d in dists}})
    return rows


# --- the gateway ------------------------------------------------------------------------------------------


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} is not in /proc/{pid}/status")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the gateway is one process; a helper it forks would count too)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            todo += [int(c) for c in children]
    return out


def start_gateway(python: Path | str, serve: list[str], cwd: Path, env: dict | None = None, threads: int = 1,
                  log: Path | None = None) -> tuple[subprocess.Popen, str, str]:
    """``python -m serving.server SERVE...`` (``--run RUN --model NAME`` or ``--repository REPO``) on
    free loopback ports; (process, gRPC target, HTTP URL). Its stderr goes to ``log``, when given."""
    grpc_port, http_port = free_port(), free_port()
    cmd = [str(python), "-m", "serving.server", *serve, "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
           "--http-port", str(http_port), "--threads", str(threads), "--log-level", "WARNING"]
    stderr = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed by stop())
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    proc.log = stderr  # type: ignore[attr-defined]
    return proc, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM (the gateway drains and exits); its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if getattr(proc, "log", None) not in (None, subprocess.DEVNULL):
        proc.log.close()
    return proc.returncode


def measure_start(python: Path | str, run: Path, model: str, cwd: Path, image: bytes, requests: int,
                  env: dict | None = None, log: Path | None = None) -> dict:
    """One start: seconds to ready, RSS at ready, peak RSS after ``requests`` predictions (MiB)."""
    t0 = time.monotonic()
    proc, _, url = start_gateway(python, ["--run", str(run), "--model", model], cwd, env, log=log)
    try:
        wait_http_ready(url, proc, timeout=180, poll=0.02)
        ready_s = time.monotonic() - t0
        pids = process_tree(proc.pid)
        rss_ready = sum(status_kb(p, "VmRSS") for p in pids) / 1024
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(requests):
                answer = client.post(f"/v1/models/{model}:predict", content=image,
                                     headers={"Content-Type": "image/png"})
                if answer.status_code != 200:
                    raise RuntimeError(f"a prediction was answered with HTTP {answer.status_code}: {answer.text}")
        peak = sum(status_kb(p, "VmHWM") for p in process_tree(proc.pid)) / 1024
        return {"ready_s": ready_s, "rss_ready_mib": rss_ready, "peak_rss_mib": peak, "processes": len(pids)}
    finally:
        stop(proc)


# runs a module as `python -m MODULE ARGS` would, then writes its exit status, the modules it loaded
# and VmHWM: the peak of this process image only (the rusage high-water mark would also count the
# forking parent's pages before exec)
MODULE_PROBE = r"""
import json, runpy, sys
out, module, *args = sys.argv[1:]
sys.argv = [module, *args]
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as stop:
    code = stop.code or 0
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
with open(out, "w") as f:
    json.dump({"exit": code, "modules": sorted(sys.modules), "vmhwm_kb": hwm[0] if hwm else None}, f)
"""


def probe_module(python: Path | str, module: str, *args: str, cwd: Path, env: dict | None = None,
                 timeout: float = 300) -> dict:
    """``python -m module args`` in a fresh interpreter, through `MODULE_PROBE`: its exit status,
    loaded modules, peak RSS (``vmhwm_kb``), wall ``seconds``, ``stdout`` and ``stderr``."""
    with tempfile.TemporaryDirectory(prefix="footprint-probe-") as tmp:
        out = Path(tmp) / "probe.json"
        t0 = time.monotonic()
        done = subprocess.run([str(python), "-c", MODULE_PROBE, str(out), module, *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
        seconds = time.monotonic() - t0
        if not out.is_file():
            raise RuntimeError(f"python -m {module} {' '.join(args)} died before its end (exit status "
                               f"{done.returncode}):\n{done.stderr[-3000:]}")
        return {**json.loads(out.read_text()), "seconds": seconds, "stdout": done.stdout, "stderr": done.stderr}


def measure_convert(python: Path | str, run: Path, cwd: Path, env: dict | None = None) -> dict:
    """One ``python -m serving.convert RUN`` into an empty repository: wall seconds and peak RSS (MiB)."""
    with tempfile.TemporaryDirectory(prefix="footprint-repository-") as repository:
        got = probe_module(python, "serving.convert", str(run), "--repository", repository, "--name", "footprint",
                           cwd=cwd, env=env)
    if got["exit"] != 0:
        raise RuntimeError(f"serving.convert exited with {got['exit']}: {got['stderr'][-2000:]}")
    return {"convert_s": got["seconds"], "convert_peak_mib": got["vmhwm_kb"] / 1024}


# --- the two sides -----------------------------------------------------------------------------------------


def before_tree(rev: str, where: Path) -> Path:
    """A git worktree of ``rev`` at ``where`` (made once, kept for later runs)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", f"{rev}^{{commit}}"], capture_output=True,
                         text=True, check=True).stdout.strip()
    if where.exists():
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.stdout.strip() != sha:
            raise SystemExit(f"{where} exists but is not a worktree of {rev} ({sha[:12]}); remove it "
                             f"(git worktree remove --force {where}) or pass another --before-tree")
        return where
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), sha], check=True,
                   capture_output=True)
    return where


def tree_env(tree: Path) -> dict:
    """An environment that imports the packages of ``tree`` ahead of the venv's editable install."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def train_small_model(python: Path | str, tree: Path, out: Path) -> Path:
    if (out / "manifest.json").is_file():
        return out
    subprocess.run([str(python), "-m", "training.run", "--dataset", "synthetic-scenes", "--encoder", "tiny",
                    "--image-size", "64", "96", "--train-samples", "16", "--val-samples", "8", "--batch-size",
                    "8", "--epochs", "1", "--out", str(out)], cwd=tree, env=tree_env(tree), check=True,
                   stdout=subprocess.DEVNULL)
    return out


def torch_pin(wheel: Path) -> str:
    """``torch==X.Y.Z`` of a torch wheel file name (the local label, ``+cpu``, matches it)."""
    version = wheel.name.split("-")[1].split("+")[0]
    return f"torch=={version}"


# --- report ---------------------------------------------------------------------------------------------------


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


ROWS = [  # (key, what it is, format)
    ("ready_s", "gateway: start to ready (s)", "{:.2f}"),
    ("rss_ready_mib", "gateway: RSS at ready (MiB)", "{:.0f}"),
    ("peak_rss_mib", "gateway: peak RSS after the predictions (MiB)", "{:.0f}"),
    ("convert_s", "serving.convert: wall time (s)", "{:.2f}"),
    ("convert_peak_mib", "serving.convert: peak RSS (MiB)", "{:.0f}"),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(result: dict) -> str:
    env, lines = result["env"], []
    lines += [f"{env['date']}, {env['cores']} cores ({env['cpu']}), Python {env['python']}, load average "
              f"{env['load_start']} at the start and {env['load_end']} at the end.", "",
              "| install | site-packages (MiB) | distributions | torch |", "|---|---|---|---|"]
    for row in result["sizes"]:
        lines.append(f"| {row['install']} | {row['bytes'] / MB:,.0f} | {row['distributions']} | "
                     f"{'yes' if row['torch'] else 'no'} |")
    before, after = result["rounds"]["before"], result["rounds"]["after"]
    lines += ["", f"Median of {result['repeats']} interleaved rounds on `{result['run']}` "
              f"({result['image_size'][0]}x{result['image_size'][1]}); the gateway answers {result['requests']} "
              "HTTP predictions before its peak is read:", "",
              f"| measured | before: {result['labels']['before']} | after: {result['labels']['after']} | after / before |",
              "|---|---|---|---|"]
    for key, what, fmt in ROWS:
        b, a = median_of(before, key), median_of(after, key)
        lines.append(f"| {what} | {fmt.format(b)} | {fmt.format(a)} | {a / b:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.footprint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="3115934", help="git revision measured as 'before' (default: %(default)s)")
    p.add_argument("--before-tree", type=Path, help="its worktree (default: TMPDIR/parsimony-before-REV)")
    p.add_argument("--run", type=Path, help="an exported run to serve (default: a small one trained by --before)")
    p.add_argument("--full-venv", type=Path, default=ROOT / ".venv", help="the full install (default: .venv)")
    p.add_argument("--torch-wheel", type=Path, help="a CPU torch wheel: also measure the --before gateway install")
    p.add_argument("--repeats", type=int, default=5, help="starts each way (default: %(default)s)")
    p.add_argument("--requests", type=int, default=20, help="predictions before the peak RSS (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "footprint", help="results and venvs (default: %(default)s)")
    p.add_argument("--reuse-venvs", action="store_true", help="keep the venvs of an earlier run (sizes as then)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    full = args.full_venv.resolve() / "bin" / "python"
    tree = before_tree(args.before, args.before_tree or Path(tempfile.gettempdir()) / f"parsimony-before-{args.before}")
    started = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}

    print("building the wheel and the role venvs", file=sys.stderr)
    wheel = build_wheel(ROOT, out / "wheels")
    venvs = {"empty venv (pip, setuptools)": out / "venvs" / "empty", "'.[client]'": out / "venvs" / "client",
             "'.[serve]'": out / "venvs" / "serve"}
    installs = {"'.[client]'": [[f"{wheel}[client]"]], "'.[serve]'": [[f"{wheel}[serve]"]]}
    if args.torch_wheel:
        old_wheel = build_wheel(tree, out / "wheels-before", python=str(full))
        pin = out / "torch-pin.txt"
        pin.write_text(torch_pin(args.torch_wheel) + "\n")
        venvs[f"{args.before} base install (the gateway image then; CPU torch)"] = out / "venvs" / "before-gateway"
        installs[f"{args.before} base install (the gateway image then; CPU torch)"] = [
            [str(args.torch_wheel)], ["--constraint", str(pin), str(old_wheel)]]
    pythons = {}
    for name, path in venvs.items():
        python = path / "bin" / "python"
        pythons[name] = python if args.reuse_venvs and python.exists() else role_venv(path, *installs.get(name, []))
    pythons["full (`make venv`: every extra, test tools, CUDA torch)"] = full
    size_rows = sizes(pythons)

    run = (args.run or train_small_model(full, tree, out / "model")).resolve()
    image = demo_image(run)
    size = Image.open(io.BytesIO(image)).size[::-1]
    serve_python, scratch = pythons["'.[serve]'"], out / "cwd"
    scratch.mkdir(exist_ok=True)
    sides = {"before": (full, tree, tree_env(tree)), "after": (serve_python, scratch, None)}
    rounds: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.repeats + 1):  # the first round warms up and is left out
        for side, (python, cwd, env) in sides.items():
            got = {**measure_start(python, run, "footprint", cwd, image, args.requests, env, log=out / f"{side}.log"),
                   **measure_convert(python, run, cwd, env)}
            print(f"{'warm-up' if i == 0 else f'round {i}'} {side}: " +
                  ", ".join(f"{key} {got[key]:.2f}" for key, _, _ in ROWS), file=sys.stderr)
            if i:
                rounds[side].append(got)

    env = {**started, "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()), "cores": os.cpu_count(),
           "cpu": cpu_name(), "python": platform.python_version()}
    result = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "wheel": wheel.name, "sizes": size_rows,
              "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run), "image_size": size,
              "repeats": args.repeats, "requests": args.requests, "rounds": rounds,
              "labels": {"before": f"{args.before}, full venv", "after": "working tree, '.[serve]' venv"}}
    text = report(result)
    (out / "footprint.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "footprint.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
