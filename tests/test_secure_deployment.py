"""Provisioning (CA, server certificate, SuperNode keys, kits) and a TLS + authenticated loopback deployment."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.ops.processes import PROJECT_ROOT, ProcessGroup, flwr_run, flwr_status, free_port, start_supernode
from client.keys import keygen
from server.ops.provision import (
    AUTHORIZED_DIR,
    CA_DIR,
    COORDINATOR,
    ProvisionError,
    provision,
)
from server.ops.deploy import (
    CONNECTION,
    REGISTRATIONS,
    list_supernodes,
    site_start,
    start_secure_superlink,
    start_secure_supernode,
)
from tests.conftest import TEST_OVERRIDES

pytestmark = [pytest.mark.deployment]

DEMO = PROJECT_ROOT / "conf" / "federation_kit" / "demo.yaml"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _loopback_federation(tmp: Path, centers: list[tuple[str, str]], port: int | None = None) -> tuple[Path, int]:
    """A federation file for a loopback SuperLink on a free port."""
    port = port or free_port()
    fed = {"federation": "loopback-test",
           "superlink": {"address": "127.0.0.1", "port": port, "bind_host": "127.0.0.1",
                         "dns_names": ["localhost"], "ip_addresses": ["127.0.0.1"]},
           "centers": [{"center_id": c, "display_name": c.upper(), "role": r} for c, r in centers]}
    path = tmp / "federation.yaml"
    path.write_text(yaml.safe_dump(fed))
    return path, port


def _site_keys(tmp: Path, centers, force: bool = False) -> Path:
    """Each site makes its own key pair (`newadj site keygen`); the coordinator receives only the .pub files."""
    received = tmp / "received-public-keys"
    received.mkdir(exist_ok=True)
    for c in centers:
        _priv, pub = keygen(tmp / "site-keys" / c, c, force=force)
        shutil.copy(pub, received / pub.name)
    return received


def _key(tmp: Path, center: str) -> Path:
    return tmp / "site-keys" / center / "supernode.key"


def _provision(fed: Path, kits: Path, tmp: Path, **kw) -> dict:
    centers = [c["center_id"] for c in yaml.safe_load(Path(fed).read_text())["centers"]]
    return provision(fed, kits, public_keys=_site_keys(tmp, centers), **kw)


def _rogue_kit(legit_kit: Path, dest: Path) -> Path:
    """A copy of a legitimate kit (same CA, same address) with a key pair that was never registered."""
    shutil.copytree(legit_kit, dest)
    keygen(dest, "rogue")
    shutil.copy(dest / "rogue.pub", dest / "supernode.pub")   # the rogue edits the kit to pass the local check
    return dest


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _wait(pred, timeout: float, step: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val or time.monotonic() > deadline:
            return val
        time.sleep(step)


# --------------------------------------------------------------------------- provisioning


def test_provision_takes_the_sites_public_keys_and_holds_no_center_private_key(tmp_path):
    kits = tmp_path / "kits"
    fed = yaml.safe_load(DEMO.read_text())
    centers = [c["center_id"] for c in fed["centers"]]
    # no public key from a site: refused, naming the center and what the site must do
    with pytest.raises(ProvisionError, match="center center_a: no public key.*newadj site keygen"):
        provision(DEMO, kits)
    received = _site_keys(tmp_path, centers)
    s = provision(DEMO, kits, public_keys=received)
    assert s["ca_created"] and s["server_cert_issued"] and sorted(s["keys_generated"]) == sorted(centers)

    # CA: self-signed, CA:true, may sign certificates
    ca = x509.load_pem_x509_certificate((kits / CA_DIR / "ca.pem").read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca.verify_directly_issued_by(ca)
    assert _mode(kits / CA_DIR / "ca.key") == 0o600 and _mode(kits / CA_DIR) == 0o700

    # server certificate: signed by the CA, SANs from the file (127.0.0.1 and localhost among them)
    coord = kits / COORDINATOR
    cert = x509.load_pem_x509_certificate((coord / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", *fed["superlink"]["dns_names"]} <= set(san.get_values_for_type(x509.DNSName))
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    skey = serialization.load_pem_private_key((coord / "server.key").read_bytes(), None)
    assert skey.public_key().public_numbers() == cert.public_key().public_numbers()
    assert _mode(coord / "server.key") == 0o600 and _mode(coord) == 0o700
    assert (coord / "ca.pem").read_bytes() == (kits / CA_DIR / "ca.pem").read_bytes()
    assert "newadj server start --kit ." in (coord / "start.sh").read_text() and os.access(coord / "start.sh", os.X_OK)
    ckit = tomllib.loads((coord / "kit.toml").read_text())
    assert [c["center_id"] for c in ckit["centers"]] == centers

    # the site's key: made at the site, owner-only; the coordinator holds no center private key anywhere
    for c in fed["centers"]:
        cid = c["center_id"]
        site_key = _key(tmp_path, cid)
        assert _mode(site_key) == 0o600 and _mode(site_key.parent) == 0o700
        priv = serialization.load_ssh_private_key(site_key.read_bytes(), None)
        kit = kits / cid
        pub = serialization.load_ssh_public_key((kit / "supernode.pub").read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
        assert priv.public_key().public_numbers() == pub.public_numbers()
        assert (kit / "supernode.pub").read_bytes() == (received / f"{cid}.pub").read_bytes()
        assert (coord / AUTHORIZED_DIR / f"{cid}.pub").read_bytes() == (kit / "supernode.pub").read_bytes()
        assert (kit / "ca.pem").read_bytes() == (kits / CA_DIR / "ca.pem").read_bytes()
        meta = tomllib.loads((kit / "kit.toml").read_text())
        assert "private_key" not in meta["files"]
        assert meta["center"] == {"center_id": cid, "display_name": c["display_name"], "role": c["role"]}
        assert meta["superlink"]["address"] == f"{fed['superlink']['address']}:{fed['superlink']['port']}"
        assert 'newadj site start --kit . --key' in (kit / "start.sh").read_text()
    for f in kits.rglob("*"):
        if f.is_file() and f.name not in ("ca.key", "server.key"):
            assert b"PRIVATE KEY" not in f.read_bytes(), f"{f} holds a private key"
    assert sorted(p.stem for p in (coord / AUTHORIZED_DIR).glob("*.pub")) == sorted(centers)


def test_rekeying_one_center_leaves_everything_else_byte_identical(tmp_path):
    kits = tmp_path / "kits"
    _provision(DEMO, kits, tmp_path)
    before = _snapshot(kits)
    old_key_b = _key(tmp_path, "center_b").read_bytes()
    received = _site_keys(tmp_path, ["center_b"], force=True)       # center_b re-keys at its site
    assert _key(tmp_path, "center_b").read_bytes() != old_key_b
    s = provision(DEMO, kits, only=["center_b"], public_keys=received)
    after = _snapshot(kits)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"center_b/supernode.pub", f"{COORDINATOR}/{AUTHORIZED_DIR}/center_b.pub"}, changed
    assert s["keys_generated"] == ["center_b"] and not s["ca_created"] and not s["server_cert_issued"]
    assert after[f"{COORDINATOR}/{AUTHORIZED_DIR}/center_b.pub"] == (received / "center_b.pub").read_bytes()

    # a full re-run with the same public keys keeps the CA, the server certificate and every kit
    s = provision(DEMO, kits, public_keys=received)
    assert not s["ca_created"] and not s["server_cert_issued"] and not s["keys_generated"]
    assert _snapshot(kits) == after

    # unknown center, or `only` before any CA: refused
    with pytest.raises(ProvisionError):
        provision(DEMO, kits, only=["nowhere"], public_keys=received)
    with pytest.raises(ProvisionError):
        provision(DEMO, tmp_path / "empty", only=["center_a"], public_keys=received)

    # force: a new CA (and so a new server certificate)
    s = provision(DEMO, kits, force=True, public_keys=received)
    assert s["ca_created"] and s.get("ca_replaced") and s["server_cert_issued"]
    assert (kits / CA_DIR / "ca.pem").read_bytes() != after[f"{CA_DIR}/ca.pem"]


def test_site_keygen_and_site_start_check_the_sites_key(tmp_path, capsys):
    from common.cli import main

    assert main(["site", "keygen", "--center", "center_a", "--out", str(tmp_path / "k")]) == 0
    assert "center_a.pub" in capsys.readouterr().out and _mode(tmp_path / "k" / "supernode.key") == 0o600
    assert main(["site", "keygen", "--center", "center_a", "--out", str(tmp_path / "k")]) == 2   # no overwrite
    assert "already exists" in capsys.readouterr().err
    fed, _ = _loopback_federation(tmp_path, [("center_a", "train")])
    (tmp_path / "pubs").mkdir()
    shutil.copy(tmp_path / "k" / "center_a.pub", tmp_path / "pubs" / "center_a.pub")
    assert main(["provision", str(fed), "--out", str(tmp_path / "kits"), "--public-keys", str(tmp_path / "pubs")]) == 0
    kit = tmp_path / "kits" / "center_a"
    # another key than the registered one, or a key others can read: refused before anything starts
    keygen(tmp_path / "other", "center_a")
    assert site_start(kit, tmp_path, key=tmp_path / "other" / "supernode.key") == 2
    assert "not the key registered for center_a" in capsys.readouterr().out
    os.chmod(tmp_path / "k" / "supernode.key", 0o644)
    assert site_start(kit, tmp_path, key=tmp_path / "k" / "supernode.key") == 2
    assert "let others read the private key" in capsys.readouterr().out
    os.chmod(tmp_path / "k" / "supernode.key", 0o600)


def test_site_start_refuses_invalid_site(tmp_path, capsys):
    fed, _ = _loopback_federation(tmp_path, [("center_a", "train")])
    _provision(fed, tmp_path / "kits", tmp_path)
    bad = tmp_path / "not_a_site"
    bad.mkdir()
    (bad / "clinical.csv").write_text("nonsense\n1\n")
    assert site_start(tmp_path / "kits" / "center_a", bad, key=_key(tmp_path, "center_a")) == 1
    assert "not started" in capsys.readouterr().out


# --------------------------------------------------------------------------- refusals (real processes)


def test_unregistered_key_and_plaintext_supernode_are_refused(tmp_path):
    fed, _ = _loopback_federation(tmp_path, [("center_a", "train"), ("center_b", "train")])
    kits = tmp_path / "kits"
    _provision(fed, kits, tmp_path)
    rogue = _rogue_kit(kits / "center_a", tmp_path / "rogue")
    logs = tmp_path / "logs"
    group = ProcessGroup()
    try:
        addrs, env = start_secure_superlink(group, kits / COORDINATOR, tmp_path / "flwr-home", logs)
        registered = json.loads((tmp_path / "flwr-home" / REGISTRATIONS).read_text())
        assert set(registered) == {"center_a", "center_b"}
        good = start_secure_supernode(group, env, kits / "center_a", tmp_path, logs / "supernode-a.log",
                                      key=_key(tmp_path, "center_a"))
        bad = start_secure_supernode(group, env, rogue, tmp_path, logs / "supernode-rogue.log")
        plain = start_supernode(group, env, addrs.fleet, {"data-dir": str(tmp_path), "role": "train",
                                                          "center-id": "plain"}, logs / "supernode-plain.log")

        def online():
            return {n["node-id"] for n in list_supernodes(CONNECTION, env) if n["status"] == "online"}

        assert _wait(online, 60) == {str(registered["center_a"]["node_id"])}
        # refused at activation (its exit code is not reliable: flower-supernode sometimes lingers until stopped)
        assert _wait(lambda: "Failed to activate SuperNode" in (logs / "supernode-rogue.log").read_text(), 60)
        assert _wait(lambda: (logs / "supernode-plain.log").read_text().count("Connection attempt failed") >= 2, 30)
        nodes = list_supernodes(CONNECTION, env)
        assert good.poll() is None
    finally:
        group.stop()
    # only the two registered keys exist; only center_a's SuperNode ever came online
    assert {n["node-id"] for n in nodes} == {str(r["node_id"]) for r in registered.values()}
    assert {n["node-id"] for n in nodes if n["status"] == "online"} == {str(registered["center_a"]["node_id"])}
    assert "SuperNode ID" not in (logs / "supernode-rogue.log").read_text()
    assert "No SuperNode found with the given public key" in (logs / "superlink.log").read_text()
    assert "SuperNode ID" not in (logs / "supernode-plain.log").read_text()


def test_server_start_foreground_registers_and_rotates_keys(tmp_path):
    """`newadj server start`: registers the kit's keys; after re-provisioning a center, a restart swaps its key."""
    fed, port = _loopback_federation(tmp_path, [("center_a", "train"), ("center_b", "external")])
    kits = tmp_path / "kits"
    _provision(fed, kits, tmp_path)
    state = kits / COORDINATOR / "state"

    def run_server() -> dict:
        code = f"import sys; from server.ops.deploy import server_start; sys.exit(server_start({str(kits / COORDINATOR)!r}))"
        p = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out = []
        try:
            for line in p.stdout:
                out.append(line)
                if "center(s) authorized" in line:
                    break
            assert p.poll() is None, "".join(out)
            env = {**os.environ, "FLWR_HOME": str(state / "flwr-home")}
            nodes = list_supernodes(CONNECTION, env)
        finally:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return {"nodes": {n["node-id"]: n["status"] for n in nodes},
                "registered": json.loads((state / REGISTRATIONS).read_text()), "rc": p.returncode}

    first = run_server()
    assert first["rc"] == 0
    ids1 = {c: str(r["node_id"]) for c, r in first["registered"].items()}
    assert set(ids1) == {"center_a", "center_b"} and set(first["nodes"]) == set(ids1.values())
    assert _mode(state) == 0o700

    provision(fed, kits, only=["center_b"], public_keys=_site_keys(tmp_path, ["center_b"], force=True))
    second = run_server()
    ids2 = {c: str(r["node_id"]) for c, r in second["registered"].items()}
    assert ids2["center_a"] == ids1["center_a"] and ids2["center_b"] != ids1["center_b"]
    live = {n for n, s in second["nodes"].items() if s != "unregistered"}
    assert live == set(ids2.values())      # the old key of center_b no longer counts


# --------------------------------------------------------------------------- a full run


@pytest.mark.slow
def test_tls_authenticated_secagg_deployment_runs_to_completion(tiny_cohort, tmp_path):
    from common.data.cohort import discover_sites

    sites = discover_sites(tiny_cohort)
    assert len(sites) == 7
    fed, _ = _loopback_federation(tmp_path, [(s.name, s.role) for s in sites])
    kits = tmp_path / "kits"
    _provision(fed, kits, tmp_path)
    rogue = _rogue_kit(kits / sites[0].name, tmp_path / "rogue")
    run_dir, logs, home = tmp_path / "run", tmp_path / "logs", tmp_path / "flwr-home"
    group = ProcessGroup()
    status, nodes_seen = {}, []
    try:
        addrs, env = start_secure_superlink(group, kits / COORDINATOR, home, logs)
        nodes = [start_secure_supernode(group, env, kits / s.name, s.path, logs / f"supernode-{s.name}.log",
                                        key=_key(tmp_path, s.name)) for s in sites]
        bad = start_secure_supernode(group, env, rogue, sites[0].path, logs / "supernode-rogue.log")
        # production settings: TLS, SuperNode authentication and SecAgg+ (each SecAgg+ stage is a
        # message, so this also shows the protocol state survives Flower's per-message ClientApp processes)
        overrides = TEST_OVERRIDES + ["federation.secure_aggregation.enabled=true"]
        run_id = flwr_run(CONNECTION, env, {"run-dir": str(run_dir), "overrides": " ".join(overrides),
                                            "expected-nodes": len(sites)}, logs / "flwr-run.log", timeout=900)
        assert run_id is not None, (logs / "flwr-run.log").read_text()[-3000:]
        status = flwr_status(CONNECTION, env, run_id)
        nodes_seen = list_supernodes(CONNECTION, env)
        assert all(p.poll() is None for p in nodes), "a SuperNode died during the run"
    finally:
        group.stop()
    assert all(p.poll() is not None for p in group.procs + nodes + [bad])
    assert "finished:completed" in str(status.get("status", "")).replace(" ", ""), status
    registered = json.loads((home / REGISTRATIONS).read_text())
    assert {n["node-id"] for n in nodes_seen} == {str(r["node_id"]) for r in registered.values()}
    rogue_log = (logs / "supernode-rogue.log").read_text()
    assert "Failed to activate SuperNode" in rogue_log and "SuperNode ID" not in rogue_log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds"] == 2 and len(metrics["history"]) == 2
    assert set(metrics["centers"]) == {s.name for s in sites}
    assert metrics["privacy"]["secure_aggregation"] is True
    for h in metrics["history"]:
        assert not h["failures"] and h["n_train_replies"] == 6 and h["train_loss"] is not None
    assert (run_dir / "checkpoints" / "round_002.pt").exists()
