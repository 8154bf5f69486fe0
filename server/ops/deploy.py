"""TLS + SuperNode-authenticated Flower deployment from `newadj provision` kits.

Flower 1.42 facts this module relies on (checked in the installed flwr source):

* ``flower-superlink`` serves the Fleet, Control and Runtime APIs over HTTP(S) on one
  ``--host/--port``; TLS: ``--ssl-certfile --ssl-keyfile --ssl-ca-certfile``.  Its
  SuperExec dials ``127.0.0.1:PORT`` with the CA file as root certificate.  So the SuperLink
  listens on the coordinator's loopback only (``control_port``) and nginx, on the federation's
  address, passes the Fleet API to it and nothing else (``server/ops/door.py``).
* ``--enable-supernode-auth`` (requires TLS) turns off self-registration over the
  Fleet API; each SuperNode's public key must be registered through the Control API
  (``flwr supernode register KEY.pub CONNECTION``; ``--auth-list-public-keys`` is
  rejected by 1.41).  A SuperNode whose key is not registered fails to activate.
* ``flower-supernode --root-certificates CA.pem --auth-supernode-private-key KEY``:
  the key is an OpenSSH EC private key (NIST curve); the public key is derived from
  it (``--auth-supernode-public-key`` is deprecated and not passed).  The key is the
  site's own (``newadj site keygen``); a center kit holds only its public key, and
  ``site start`` refuses a key that is not the one the kit registers.
* the ``flwr`` CLI reads ``root-certificates`` from ``FLWR_HOME/config.toml``.

``start_secure_superlink`` / ``start_secure_supernode`` start background processes in
a :class:`~server.ops.processes.ProcessGroup` (tests, demos); ``server_start`` /
``site_start`` run them in the foreground (``newadj server start`` / ``newadj site
start``) and return an exit code.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from server.ops.processes import (
    ProcessGroup,
    SuperLinkAddresses,
    bin_path,
    flwr_env,
    free_port,
    site_command,
    wait_port,
    write_flwr_config,
)

__all__ = ["Kit", "load_kit", "CONNECTION", "start_secure_superlink", "start_secure_supernode",
           "register_supernodes", "list_supernodes", "superlink_command", "supernode_command",
           "server_start", "site_start"]

CONNECTION = "federation"          # name of the SuperLink connection in FLWR_HOME/config.toml
REGISTRATIONS = "registered_supernodes.json"
IN_MEMORY_DB = ":flwr-in-memory:"  # flower-superlink's default --database


class KitError(ValueError):
    """A startup kit is missing or malformed."""


@dataclass
class Kit:
    dir: Path
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.data.get("kit", {}).get("kind", "")

    @property
    def federation(self) -> str:
        return self.data.get("kit", {}).get("federation", "")

    def file(self, key: str) -> Path:
        rel = self.data.get("files", {}).get(key)
        if not rel:
            raise KitError(f"{self.dir / 'kit.toml'}: [files] has no `{key}`")
        p = Path(rel)
        return p if p.is_absolute() else self.dir / p

    @property
    def superlink_address(self) -> str:
        return str(self.data["superlink"]["address"])

    @property
    def center(self) -> dict[str, Any]:
        return self.data.get("center", {})

    @property
    def centers(self) -> list[dict[str, Any]]:
        return list(self.data.get("centers", []))


def load_kit(kit_dir: str | Path, kind: str | None = None) -> Kit:
    """Read ``KIT/kit.toml`` and check that the files it names exist (and private keys are 0600)."""
    kit_dir = Path(kit_dir).resolve()
    toml = kit_dir / "kit.toml"
    if not toml.exists():
        raise KitError(f"{toml}: not found (is {kit_dir} a startup kit from `newadj provision`?)")
    try:
        data = tomllib.loads(toml.read_text())
    except tomllib.TOMLDecodeError as err:
        raise KitError(f"{toml}: {err}") from err
    kit = Kit(kit_dir, data)
    if kind and kit.kind != kind:
        raise KitError(f"{toml}: a {kit.kind or 'unknown'} kit, expected a {kind} kit")
    keys = ("root_certificates", "public_key") if kit.kind == "center" else ("ca_cert", "server_cert", "server_key")
    for key in keys:
        if not kit.file(key).is_file():
            raise KitError(f"{kit.file(key)}: missing from the kit")
    for key in ("private_key", "server_key"):
        if key in data.get("files", {}):
            mode = kit.file(key).stat().st_mode & 0o777
            if mode & 0o077:
                raise KitError(f"{kit.file(key)}: permissions {oct(mode)} let others read the private key; "
                               f"run `chmod 600 {kit.file(key)}`")
    if kit.kind == "center":
        for key in ("center_id", "role"):
            if not kit.center.get(key):
                raise KitError(f"{toml}: [center] has no `{key}`")
    return kit


# --------------------------------------------------------------------------- commands


def superlink_command(kit: Kit, host: str, port: int, database: str | Path) -> list[str]:
    """``flower-superlink`` with TLS (the kit's CA and server certificate) and SuperNode authentication."""
    return [bin_path("flower-superlink"), "--host", host, "--port", str(port), "--database", str(database),
            "--ssl-ca-certfile", str(kit.file("ca_cert")), "--ssl-certfile", str(kit.file("server_cert")),
            "--ssl-keyfile", str(kit.file("server_key")), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation"]


def site_key(kit: Kit, key: str | Path | None = None) -> Path:
    """The site's private key for this kit: ``key``, else ``KIT/supernode.key``; checked against the kit's public key."""
    from client.keys import KeyError_, fingerprint, load_private_key, load_public_key, same_key

    path = Path(key) if key else kit.dir / "supernode.key"
    try:
        priv = load_private_key(path)
        pub = load_public_key(kit.file("public_key"))
    except KeyError_ as exc:
        raise KitError(str(exc)) from exc
    if not same_key(priv, pub):
        raise KitError(f"{path}: not the key registered for {kit.center.get('center_id')} (its public key is "
                       f"{fingerprint(priv.public_key())}, the kit's is {fingerprint(pub)}); use the key made "
                       "with `newadj site keygen` for this center, or send its .pub for re-provisioning")
    return path


def supernode_command(kit: Kit, data_dir: str | Path, superlink: str | None = None,
                      runtime_port: int | None = None, key: str | Path | None = None) -> list[str]:
    """The site's processes from a center kit (``client/executor.py``): ``flower-supernode`` with TLS (the kit's
    CA), the site's own authentication key and process isolation, and the site's warm runtime."""
    c = kit.center
    node_config = {"data-dir": str(Path(data_dir).resolve()), "role": c["role"], "center-id": c["center_id"]}
    port = runtime_port or int(kit.data.get("supernode", {}).get("runtime_port", 9094))
    return site_command(superlink or kit.superlink_address, node_config, port,
                        tls=["--root-certificates", str(kit.file("root_certificates")),
                             "--auth-key", str(site_key(kit, key))])


def control_port(kit: Kit) -> int:
    """The SuperLink's own port on the coordinator's loopback (the kit's ``control_port``, else port + 1)."""
    sl = kit.data["superlink"]
    return int(sl.get("control_port") or int(sl["port"]) + 1)


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else ("::1" if host == "::" else host)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- registration


def _key_fingerprint(pub_file: Path) -> str:
    parts = pub_file.read_text().split()
    return hashlib.sha256(" ".join(parts[:2]).encode()).hexdigest()


def _flwr(args: list[str], env: dict, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path("flwr"), *args], env=env, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _json_tail(text: str) -> dict:
    """The JSON object in ``flwr ... --format json`` output (it may be preceded by other lines)."""
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


def list_supernodes(connection: str, env: dict, cwd: Path | None = None) -> list[dict]:
    """``flwr supernode list CONNECTION --format json`` (node-id, status, ...); raises on failure."""
    cwd = Path(cwd or env["FLWR_HOME"])
    out = _flwr(["supernode", "list", connection, "--format", "json"], env, cwd)
    data = _json_tail(out.stdout)
    if "nodes" not in data:
        raise RuntimeError(f"flwr supernode list failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")
    return list(data["nodes"])


def register_supernodes(kit: Kit, connection: str, env: dict, state_file: Path,
                        echo: Callable[[str], None] | None = None) -> dict[str, int | None]:
    """Make the SuperLink's registered keys match the coordinator kit's authorized keys.

    Registers each center's public key (``flwr supernode register``), unregisters the
    key a center had before a re-provisioning (and centers no longer in the kit), and
    keeps ``state_file`` (center -> node id, key fingerprint) next to the database so a
    restart with the same database registers nothing twice.  Returns center -> node id.
    """
    cwd = Path(env["FLWR_HOME"])
    prev: dict[str, dict] = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        live = {str(n["node-id"]): n.get("status") for n in list_supernodes(connection, env, cwd)}
    except RuntimeError:
        live = {}
    current: dict[str, dict] = {}

    def unregister(node_id) -> None:
        if node_id is not None and live.get(str(node_id)) not in (None, "unregistered"):
            out = _flwr(["supernode", "unregister", str(node_id), connection], env, cwd)
            if echo:
                echo(f"unregistered SuperNode {node_id}" if out.returncode == 0
                     else f"could not unregister SuperNode {node_id}: {(out.stdout + out.stderr)[-500:]}")

    for c in kit.centers:
        cid = c["center_id"]
        pub = kit.dir / c["public_key"]
        if not pub.is_file():
            raise KitError(f"{pub}: public key of {cid} missing from the coordinator kit")
        fp = _key_fingerprint(pub)
        rec = prev.get(cid)
        if rec and rec.get("fingerprint") == fp and live.get(str(rec.get("node_id"))) not in (None, "unregistered"):
            current[cid] = rec
            continue
        if rec and rec.get("fingerprint") != fp:
            unregister(rec.get("node_id"))   # the key this center had before re-provisioning
        out = _flwr(["supernode", "register", str(pub), connection, "--name", cid, "--format", "json"], env, cwd)
        data = _json_tail(out.stdout)
        if data.get("success") and data.get("node-id") is not None:
            current[cid] = {"node_id": int(data["node-id"]), "fingerprint": fp}
            if echo:
                echo(f"registered {cid}: SuperNode {data['node-id']}")
        elif "already" in (out.stdout + out.stderr).lower() or "in use" in (out.stdout + out.stderr).lower():
            current[cid] = {"node_id": (rec or {}).get("node_id"), "fingerprint": fp}
        else:
            raise RuntimeError(f"flwr supernode register {pub} failed ({out.returncode}): "
                               f"{(out.stdout + out.stderr)[-2000:]}")
    for cid, rec in prev.items():
        if cid not in current:
            unregister(rec.get("node_id"))   # center removed from the federation
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(current, indent=2) + "\n")
    return {cid: rec.get("node_id") for cid, rec in current.items()}


# --------------------------------------------------------------------------- background (tests, demos)


def start_secure_superlink(group: ProcessGroup, coordinator_kit: str | Path, flwr_home: Path, log_dir: Path,
                           host: str | None = None, port: int | None = None,
                           connection: str = CONNECTION,
                           database: str | Path | None = None) -> tuple[SuperLinkAddresses, dict]:
    """The coordinator from its kit: a TLS + SuperNode-auth ``flower-superlink`` on 127.0.0.1:control_port with
    every center's key registered, and nginx on ``host``/``port`` (default: the kit's ``bind_host``/``port``)
    passing the Fleet API only (``server/ops/door.py``).

    The `flwr` CLI's ``config.toml`` (connection ``connection``, TLS with the kit's CA, the loopback Control API)
    lives in ``flwr_home``.  ``database``: the SuperLink state; default Flower's in-memory state (a SQLite file
    hit "database is locked" under load on a 2-core loopback host with seven SuperNodes; ``server_start``
    keeps a file, for restarts).  Returns the addresses (Control: loopback; Fleet: the door) and the
    environment for the `flwr` CLI.
    """
    from server.ops.door import nginx_command

    kit = load_kit(coordinator_kit, "coordinator")
    host = host or str(kit.data["superlink"].get("bind_host", "127.0.0.1"))
    port = int(port or kit.data["superlink"]["port"])
    cport = control_port(kit)
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flwr_env(flwr_home)
    p = group.start(superlink_command(kit, "127.0.0.1", cport, database or IN_MEMORY_DB), env,
                    Path(log_dir) / "superlink.log")
    wait_port(cport, 60, p)
    door_state = Path(log_dir) / "door"
    door = group.start(nginx_command(kit, door_state, host, port, cport), env, Path(log_dir) / "nginx.log")
    wait_port(port, 30, door, host=_loopback(host))
    control = _hostport("127.0.0.1", cport)
    write_flwr_config(flwr_home, connection, control, insecure=False, root_certificates=kit.file("ca_cert"))
    register_supernodes(kit, connection, env, flwr_home / REGISTRATIONS)
    return SuperLinkAddresses(control, _hostport(_loopback(host), port)), env


def start_secure_supernode(group: ProcessGroup, env: dict, center_kit: str | Path, data_dir: str | Path,
                           log_path: Path, superlink: str | None = None,
                           runtime_port: int | None = None, key: str | Path | None = None) -> subprocess.Popen:
    """A ``flower-supernode`` from a center kit (TLS with the kit's CA, its auth key, its center id and role).

    ``superlink`` overrides the kit's address; the local Runtime API gets ``runtime_port``
    (default: a free port, so several SuperNodes can share one host).
    """
    kit = load_kit(center_kit, "center")
    return group.start(supernode_command(kit, data_dir, superlink, runtime_port or free_port(), key), env,
                       Path(log_path))


# --------------------------------------------------------------------------- foreground (CLI)


def _run_foreground(commands: list[list[str]], env: dict, cwd: Path | None = None,
                    on_started: Callable[[list[subprocess.Popen]], None] | None = None) -> int:
    """Run ``commands`` together until one exits; SIGINT/SIGTERM are passed on to all of them.

    When one ends the others are stopped.  Returns the exit code of the one that ended first, 0 when
    they ended because of a signal passed on (a requested stop).
    """
    procs = [subprocess.Popen(args, env=env, cwd=cwd) for args in commands]
    forwarded = {}
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def stop_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    for sig in (signal.SIGINT, signal.SIGTERM):
        forwarded[sig] = signal.signal(sig, forward)
    try:
        if on_started is not None:
            try:
                on_started(procs)
            except Exception:
                stop_all()
                raise
        first = None
        while first is None:
            first = next((p for p in procs if p.poll() is not None), None)
            if first is None:
                time.sleep(0.2)
        rc = first.returncode
        stop_all()
        if received and (rc < 0 or rc in (130, 143) or rc in (1, 2, 3)):
            return 0   # stopped on request (uvicorn re-raises the signal; flwr uses codes 1-3 for it)
        return rc
    finally:
        for sig, old in forwarded.items():
            signal.signal(sig, old)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def server_start(kit_dir: str | Path, echo: Callable[[str], None] = print, database: str | None = None) -> int:
    """`newadj server start --kit DIR`: the SuperLink (TLS + SuperNode auth) on the coordinator's loopback and
    nginx on the federation's address passing the Fleet API only, both in the foreground.

    State (database, registrations, the `flwr` CLI's FLWR_HOME, nginx's files) lives in the kit's
    ``state_dir``; each center's public key is registered once the SuperLink listens.
    """
    from server.ops.door import DoorError, nginx_command

    try:
        kit = load_kit(kit_dir, "coordinator")
        state = kit.dir / kit.data.get("files", {}).get("state_dir", "state")
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        host = str(kit.data["superlink"].get("bind_host", "0.0.0.0"))
        port, cport = int(kit.data["superlink"]["port"]), control_port(kit)
        door = nginx_command(kit, state / "door", host, port, cport)
    except (KitError, DoorError) as err:
        echo(f"server start: {err}")
        return 2
    home = state / "flwr-home"
    home.mkdir(exist_ok=True)
    env = flwr_env(home)
    control = _hostport("127.0.0.1", cport)

    def ready(procs: list[subprocess.Popen]) -> None:
        wait_port(cport, 60, procs[0])
        wait_port(port, 30, procs[1], host=_loopback(host))
        write_flwr_config(home, CONNECTION, control, insecure=False, root_certificates=kit.file("ca_cert"))
        nodes = register_supernodes(kit, CONNECTION, env, state / REGISTRATIONS, echo=echo)
        echo(f"SuperLink of {kit.federation}: the centers' Fleet API on {_hostport(host, port)} (nginx, TLS, "
             f"SuperNode authentication); {len(nodes)} center(s) authorized: {', '.join(nodes)}")
        echo(f"Control API on {control}, this host only: FLWR_HOME={home} flwr ls {CONNECTION}")

    echo(f"starting flower-superlink and its door for {kit.federation} ...")
    try:
        # a state file keeps node ids and registrations across restarts; on a heavily loaded host
        # Flower's SQLite file can fail with "database is locked": pass database=":flwr-in-memory:" there
        return _run_foreground([superlink_command(kit, "127.0.0.1", cport, database or state / "state.db"), door],
                               env, cwd=state, on_started=ready)
    except (RuntimeError, TimeoutError, KitError) as err:
        echo(f"server start: {err}")
        return 1


def site_start(kit_dir: str | Path, data_dir: str | Path, overrides: list[str] | None = None,
               echo: Callable[[str], None] = print, runtime_port: int | None = None,
               key: str | Path | None = None) -> int:
    """`newadj site start --kit DIR --data SITE`: validate the site folder, then run the SuperNode in the foreground.

    Refuses to start (exit code 1) when validation reports errors; they are printed.
    """
    from common.config import load_config
    from common.data.validation import validate_site

    try:
        kit = load_kit(kit_dir, "center")
        site_key(kit, key)
    except KitError as err:
        echo(f"site start: {err}")
        return 2
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        echo(f"site start: {data_dir}: not a folder")
        return 2
    from common.data.policy import PolicyError, with_site_config

    try:
        cfg = with_site_config(load_config(list(overrides or [])), data_dir)
    except PolicyError as err:
        echo(f"site start: {err}")
        return 2
    report = validate_site(data_dir, phases=tuple(cfg.data.phases), deep=True,
                           val_fraction=float(cfg.data.val_fraction),
                           genomic_features=list(cfg.data.genomic_features),
                           clinical_features=list(cfg.data.clinical_features), cache_dir=str(cfg.data.cache_dir))
    report.render()
    if not report.ok:
        echo(f"site start: {data_dir} has {len(report.errors)} error(s); the SuperNode was not started")
        return 1
    c = kit.center
    site_id, site_role = report.summary.get("center_id"), report.summary.get("role")
    if site_role and site_role != c["role"]:
        echo(f"warning: the site folder says role {site_role!r} but the kit says {c['role']!r}; "
             "the kit's role is the one the federation uses")
    if site_id and site_id != c["center_id"]:
        echo(f"note: site folder center_id {site_id!r} differs from the kit's {c['center_id']!r}; "
             "the kit's id is used")
    from common.data.policy import load_policy

    policy = load_policy(data_dir)
    if not policy.approved_bundles:
        echo(f"warning: {data_dir / 'policy.toml'} approves no app bundle yet: this site refuses every run until "
             "its IT reviews the coordinator's bundle and runs `newadj site approve --site SITE_DIR BUNDLE.fab`")
    home = kit.dir / "flwr-home"
    home.mkdir(exist_ok=True)
    env = flwr_env(home)
    echo(f"starting the site {c['center_id']} ({c['role']}) -> {kit.superlink_address} (TLS, authenticated): "
         f"flower-supernode in process isolation and this site's runtime of newadj {policy.pinned_version}, "
         f"{len(policy.approved_bundles)} approved bundle(s)")
    return _run_foreground([supernode_command(kit, data_dir, runtime_port=runtime_port, key=key)], env, cwd=kit.dir)


if __name__ == "__main__":  # pragma: no cover - manual use: python -m server.ops.deploy server|site KIT [DATA]
    if sys.argv[1:2] == ["server"]:
        sys.exit(server_start(sys.argv[2]))
    sys.exit(site_start(sys.argv[2], sys.argv[3]))
