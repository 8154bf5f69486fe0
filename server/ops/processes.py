"""Start, use and stop Flower's own processes (SuperLink, SuperNodes, `flwr` CLI).

Every process started here is tracked by PID and stopped by it; each run gets
its own ``FLWR_HOME`` and free loopback ports, so nothing collides with another
run or with Flower's default local SuperLink (port 39091).
"""
from __future__ import annotations

import json
import os

import psutil
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# the folder holding this project's packages: the checkout (editable install) or site-packages (`pip install .`)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
APP_PACKAGES = ("common", "client", "server", "conf")


def app_dir(root: Path | None = None) -> Path:
    """The Flower app to submit with ``flwr run``: this project's packages and ``conf/flwr_app.toml`` as the
    app's ``pyproject.toml``, copied into a folder named by their content hash (made once, then reused).

    The same whether the project runs from a checkout or from an installed package; nothing but
    sources and configuration goes into the app bundle (``fab-include``), never data or weights.
    """
    import hashlib
    import shutil
    import tempfile

    root = Path(root or PROJECT_ROOT)
    files = sorted(f for pkg in APP_PACKAGES for f in (root / pkg).rglob("*")
                   if f.is_file() and f.suffix in (".py", ".yaml", ".toml") and "__pycache__" not in f.parts)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    out = Path(tempfile.gettempdir()) / f"newadj-flwr-app-{h.hexdigest()[:16]}"
    if not (out / "pyproject.toml").exists():
        tmp = Path(tempfile.mkdtemp(prefix="newadj-flwr-app-", dir=tempfile.gettempdir()))
        for f in files:
            (tmp / f.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / f.relative_to(root))
        shutil.copy2(root / "conf" / "flwr_app.toml", tmp / "pyproject.toml")
        try:
            tmp.rename(out)
        except OSError:           # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_bundle(app: Path | None = None) -> bytes:
    """The app bundle (FAB) that ``flwr run APP`` submits, built the same way (Flower's own builder: fixed file
    dates, sorted files), so its SHA-256 is the one a site approves with ``newadj site approve``."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app or app_dir()))


def write_bundle(out: Path, app: Path | None = None) -> tuple[Path, str]:
    """Write the app bundle to ``out`` (a file, or a folder for Flower's file name); (path, SHA-256)."""
    import hashlib
    import tomllib

    content = build_bundle(app)
    digest = hashlib.sha256(content).hexdigest()
    out = Path(out)
    if out.is_dir():
        from flwr.cli.build import get_fab_filename

        config = tomllib.loads((Path(app or app_dir()) / "pyproject.toml").read_text())
        out = out / get_fab_filename(config, digest)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(content)
    return out, digest


def bin_path(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with code {proc.returncode} before listening on {port}")
        with socket.socket(family) as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def flwr_env(flwr_home: Path) -> dict:
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"        # Flower reports usage by default; no process of ours calls out
    env.setdefault("PYTHONUNBUFFERED", "1")
    # SuperExec looks for a new task every second by default: a message waits less (Flower 1.41's own knob;
    # the SuperNode's 3 s sleep when idle and the Grid's 3 s pull sleep have none -- we pull our own replies)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # the apps import this project: make sure they can, whatever their working directory
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class ProcessGroup:
    """Processes started for one run; ``stop()`` ends each of them (by PID)."""

    procs: list = field(default_factory=list)
    logs: list = field(default_factory=list)
    _pgids: set = field(default_factory=set)

    def start(self, args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_path, "ab")
        p = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        self.logs.append(fh)
        return p

    def stop(self, timeout: float = 10.0) -> None:
        """End every process we started *and everything it started*.

        Flower's SuperLink starts ``flower-superexec`` in a session of its own,
        which starts the ServerApp / simulation and Ray's workers: so the whole
        descendant tree and the process groups it lives in are collected first,
        sent SIGTERM, given ``timeout`` seconds, then SIGKILLed.
        """
        pids, pgids = set(), set()
        for p in self.procs:
            pgids.add(p.pid)  # each was started as a session/group leader
            pids.add(p.pid)
            try:
                for c in psutil.Process(p.pid).children(recursive=True):
                    pids.add(c.pid)
                    try:
                        pgids.add(os.getpgid(c.pid))
                    except ProcessLookupError:
                        pass
            except psutil.NoSuchProcess:
                pass
        pgids.discard(os.getpgid(0))  # never our own group
        self._pgids |= pgids
        for g in pgids:
            _signal_group(g, signal.SIGTERM)
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for pr in procs:
            try:
                pr.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for pr in alive:
            try:
                pr.kill()
            except psutil.NoSuchProcess:
                pass
        for g in pgids:
            _signal_group(g, signal.SIGKILL)
        for p in self.procs:
            p.wait()
        for fh in self.logs:
            fh.close()

    def alive(self) -> list[int]:
        """Process groups of ours that still have a live member (for tests)."""
        return [g for g in sorted(self._pgids | {p.pid for p in self.procs}) if _group_alive(g)]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    for pr in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(pr.info["pid"]) == pgid and pr.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


def write_flwr_config(flwr_home: Path, name: str, control_address: str, insecure: bool = True,
                      root_certificates: Path | None = None) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{control_address}"']
    if insecure:
        lines.append("insecure = true")
    if root_certificates:
        lines.append(f'root-certificates = "{root_certificates}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def run_config_arg(values: dict) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


RUN_ID_RE = re.compile(r"run[ _-]?id[^0-9]*(\d+)", re.IGNORECASE)


def flwr_run(superlink: str, env: dict, run_config: dict, log_path: Path, federation_config: dict | None = None,
             echo=None, timeout: float | None = None, app: Path | None = None) -> int | None:
    """``flwr run APP SUPERLINK --stream`` (APP: this project); returns the run id seen in its output (None if none).

    The run config goes to Flower as a TOML file written next to ``log_path``: Flower's
    ``key=value`` parser cuts a value at its first inner quote, so overrides holding quotes
    or lists would not reach the apps intact; a file is parsed by a real TOML reader.
    """
    import tomli_w

    config_file = Path(log_path).with_name(Path(log_path).stem + "-run-config.toml")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(tomli_w.dumps(dict(run_config)))
    args = [bin_path("flwr"), "run", str(app or app_dir()), superlink, "--run-config", str(config_file),
            "--stream"]
    if federation_config:
        args += ["--federation-config", run_config_arg(federation_config)]
    run_id = None
    with open(log_path, "a") as logf, subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT,
                                                       start_new_session=True) as p:
        deadline = None if timeout is None else time.monotonic() + timeout
        for line in p.stdout:
            logf.write(line)
            logf.flush()
            if run_id is None and (m := RUN_ID_RE.search(line)):
                run_id = int(m.group(1))
            if echo:
                echo(line.rstrip("\n"))
            if deadline and time.monotonic() > deadline:
                os.killpg(p.pid, signal.SIGTERM)
                break
        p.wait()
    return run_id


def flwr_status(superlink: str, env: dict, run_id: int) -> dict:
    """The run's record from ``flwr ls --run-id ID --format json`` (``flwr run --stream`` exits 0 even on failure)."""
    out = subprocess.run([bin_path("flwr"), "ls", superlink, "--run-id", str(run_id), "--format", "json"],
                         env=env, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    try:
        data = json.loads(out.stdout)
    except ValueError:
        return {"status": "unknown", "error": (out.stdout + out.stderr)[-2000:]}
    runs = data.get("runs") or []
    return runs[0] if runs else {"status": "unknown", "raw": data}


@dataclass
class SuperLinkAddresses:
    control: str   # `flwr` CLI (Control API)
    fleet: str     # SuperNodes connect here (Fleet HTTP API)


def start_superlink(group: ProcessGroup, flwr_home: Path, log_dir: Path, simulation: bool = False,
                    extra_args: list[str] | None = None, database: str = ":flwr-in-memory:",
                    port: int | None = None) -> tuple[SuperLinkAddresses, dict]:
    """A ``flower-superlink`` on a loopback port (a free one unless ``port`` is given: a restarted
    SuperLink takes its old port so that SuperNodes and the `flwr` CLI find it again)."""
    env = flwr_env(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    http = port or free_port()  # Flower 1.41 serves Control, Fleet and Runtime APIs over HTTP on one port
    args = [bin_path("flower-superlink"), "--host", "127.0.0.1", "--port", str(http),
            # in-memory state by default: a SQLite file hits its lock timeout on a loaded 2-core machine,
            # and runs resume from our own checkpoints, not from SuperLink state
            "--database", database,
            "--disable-runtime-dependency-installation", *(extra_args or ["--insecure"])]
    if simulation:
        args += ["--simulation", "--isolation", "subprocess"]
    p = group.start(args, env, log_dir / "superlink.log")
    wait_port(http, 60, p)
    return SuperLinkAddresses(f"127.0.0.1:{http}", f"127.0.0.1:{http}"), env


def node_config_arg(values: dict) -> str:
    return run_config_arg(values)


def site_command(fleet: str, node_config: dict, runtime_port: int | None = None,
                 tls: list[str] | None = None) -> list[str]:
    """The site's processes (``client/executor.py``): a ``flower-supernode`` in process isolation connected to
    ``fleet``, and the site's warm runtime running the installed ClientApp.  ``tls``: ``--root-certificates CA
    [--auth-key KEY]``; None: plaintext (loopback tests)."""
    args = [sys.executable, "-m", "client.executor", "--superlink", fleet, "--runtime-port", str(runtime_port or free_port()),
            "--data", str(node_config["data-dir"]), "--center", str(node_config["center-id"]),
            "--role", str(node_config["role"])]
    if node_config.get("audit-dir"):
        args += ["--audit-dir", str(node_config["audit-dir"])]
    return args + (tls if tls is not None else ["--insecure"])


def start_supernode(group: ProcessGroup, env: dict, fleet: str, node_config: dict, log_path: Path,
                    tls: list[str] | None = None) -> subprocess.Popen:
    """A site on loopback: its SuperNode connected to ``fleet`` and its warm runtime, one process tree."""
    return group.start(site_command(fleet, node_config, tls=tls), env, log_path)
