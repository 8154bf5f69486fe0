"""`newadj provision FEDERATION_FILE --out KITS_DIR`: certificates, keys and startup kits.

Everything is made with ``cryptography`` (no openssl):

* a federation CA (self-signed, ``CA:true``, key usage ``keyCertSign``/``cRLSign``),
  kept in ``KITS_DIR/_ca/`` (``ca.key`` never leaves the provisioning machine);
* the SuperLink's TLS server certificate, signed by the CA, with the federation
  file's DNS names and IP addresses as subjectAltNames (``localhost`` and
  ``127.0.0.1`` are always added: Flower 1.41's SuperLink starts its own SuperExec,
  which dials the SuperLink's HTTPS port on loopback and checks the certificate);
* no center private key, ever: each site makes its own SuperNode key pair
  (``newadj site keygen``, ``client/keys.py``) and sends only the public key; the
  federation file names it per center (``public_key: path``, relative to the file)
  or ``--public-keys DIR`` holds ``DIR/<center_id>.pub``;
* ``KITS_DIR/<center_id>/``: ``ca.pem``, ``supernode.pub`` (the key the site sent,
  for its own check), ``kit.toml``, ``start.sh``
  (``newadj site start --kit . --key KEY --data "$1"``);
* ``KITS_DIR/coordinator/``: ``ca.pem``, ``server.pem``, ``server.key`` (0600),
  ``authorized_supernodes/<center_id>.pub`` (registered with the SuperLink by
  ``newadj server start``), ``kit.toml``, ``start.sh`` (``newadj server start --kit .``).

Directories holding private keys are 0700, private keys 0600.  Re-provisioning is
conservative: an existing CA is never replaced unless ``force=True``;
``only=[center, ...]`` takes just those centers' (new) public keys and rewrites
their kits and authorized keys, touching nothing else.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["provision", "load_federation", "FederationFileError", "ProvisionError",
           "COORDINATOR", "CA_DIR", "cmd_provision"]

COORDINATOR = "coordinator"
CA_DIR = "_ca"
CENTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ROLES = ("train", "external")
RESERVED = {COORDINATOR, CA_DIR}
ALWAYS_DNS = ("localhost",)
ALWAYS_IP = ("127.0.0.1",)
TLS_CURVE = ec.SECP384R1

# kit file names (secure_deploy reads them through kit.toml, never hard-coded)
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
NODE_KEY = "supernode.key"
NODE_PUB = "supernode.pub"
AUTHORIZED_DIR = "authorized_supernodes"
KIT_TOML = "kit.toml"
START_SH = "start.sh"


class FederationFileError(ValueError):
    """The federation file is malformed."""


class ProvisionError(RuntimeError):
    """Provisioning refused to act (e.g. it would replace an existing CA)."""


# --------------------------------------------------------------------------- federation file


def load_federation(path: str | Path) -> dict[str, Any]:
    """Read and check a federation file; returns a normalized dict."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FederationFileError(f"{path}: {err}") from err
    if not isinstance(raw, dict):
        raise FederationFileError(f"{path}: expected a mapping at the top level")
    problems: list[str] = []
    name = str(raw.get("federation") or "").strip()
    if not name or not CENTER_ID_RE.match(name):
        problems.append(f"`federation` must match {CENTER_ID_RE.pattern}, got {raw.get('federation')!r}")
    sl = raw.get("superlink") or {}
    if not isinstance(sl, dict):
        problems.append("`superlink` must be a mapping")
        sl = {}
    dns = [str(d).strip() for d in (sl.get("dns_names") or [])]
    ips = []
    for ip in sl.get("ip_addresses") or []:
        try:
            ips.append(str(ipaddress.ip_address(str(ip).strip())))
        except ValueError:
            problems.append(f"superlink.ip_addresses: {ip!r} is not an IP address")
    for d in dns:
        if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})$", d):
            problems.append(f"superlink.dns_names: {d!r} is not a DNS name")
    for d in ALWAYS_DNS:
        if d not in dns:
            dns.append(d)
    for ip in ALWAYS_IP:
        if ip not in ips:
            ips.append(ip)
    address = str(sl.get("address") or (dns[0] if dns else "")).strip()
    if address not in dns and address not in ips:
        problems.append(f"superlink.address {address!r} is not among the certificate's dns_names/ip_addresses")
    try:
        port = int(sl.get("port", 9093))
        if not 0 < port < 65536:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"superlink.port must be 1..65535, got {sl.get('port')!r}")
        port = 0
    bind_host = str(sl.get("bind_host", "0.0.0.0"))
    try:   # the SuperLink itself, on the coordinator's loopback (the Control API; nginx forwards the Fleet API)
        control_port = int(sl.get("control_port", port + 1))
        if not 0 < control_port < 65536 or control_port == port:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"superlink.control_port must be 1..65535 and not the port, got {sl.get('control_port')!r}")
        control_port = 0
    validity = raw.get("validity_days") or {}
    centers = []
    seen = set()
    for i, c in enumerate(raw.get("centers") or []):
        if not isinstance(c, dict):
            problems.append(f"centers[{i}] must be a mapping")
            continue
        cid = str(c.get("center_id") or "").strip()
        role = str(c.get("role") or "train").strip()
        if not CENTER_ID_RE.match(cid):
            problems.append(f"centers[{i}].center_id must match {CENTER_ID_RE.pattern}, got {cid!r}")
        elif cid in RESERVED:
            problems.append(f"centers[{i}].center_id {cid!r} is reserved")
        elif cid in seen:
            problems.append(f"centers[{i}].center_id {cid!r} is listed twice")
        if role not in ROLES:
            problems.append(f"centers[{i}].role must be one of {ROLES}, got {role!r}")
        seen.add(cid)
        pub = c.get("public_key")
        centers.append({"center_id": cid, "display_name": str(c.get("display_name") or cid), "role": role,
                        "public_key": str((path.parent / str(pub)).resolve()) if pub else None})
    if not centers:
        problems.append("`centers` lists no center")
    if problems:
        raise FederationFileError(f"{path}:\n  " + "\n  ".join(problems))
    return {
        "federation": name,
        "superlink": {"address": address, "port": port, "bind_host": bind_host, "control_port": control_port,
                      "dns_names": dns, "ip_addresses": ips},
        "validity_days": {"ca": int(validity.get("ca", 3650)), "server": int(validity.get("server", 825))},
        "centers": centers,
    }


# --------------------------------------------------------------------------- files


def _ensure_dir(path: Path, private: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700 if private else 0o755)
    return path


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Atomic write with ``mode`` set before any byte lands (private files are never world-readable)."""
    from client.keys import atomic_write

    atomic_write(path, data, mode)


def _write_if_changed(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    if isinstance(data, str):
        data = data.encode()
    if path.exists() and path.read_bytes() == data:
        os.chmod(path, mode)
        return
    _write(path, data, mode)


def _toml_str(v: str) -> str:
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- crypto


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_ca(name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(TLS_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{name} federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def _san_of(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(san.get_values_for_type(x509.DNSName)), {str(i) for i in san.get_values_for_type(x509.IPAddress)}


def _new_server_cert(fed: dict, ca_key, ca_cert: x509.Certificate) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    sl = fed["superlink"]
    key = ec.generate_private_key(TLS_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{fed['federation']} federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, sl["address"])])
    sans = [x509.DNSName(d) for d in sl["dns_names"]] + [x509.IPAddress(ipaddress.ip_address(i))
                                                         for i in sl["ip_addresses"]]
    not_after = min(_now() + dt.timedelta(days=fed["validity_days"]["server"]), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _center_public_key(c: dict, public_keys: Path | None) -> bytes:
    """The public key a site sent for center ``c`` (checked: an OpenSSH EC key)."""
    from client.keys import KeyError_, load_public_key, public_key_file

    cid = c["center_id"]
    path = Path(c["public_key"]) if c.get("public_key") else (
        public_key_file(public_keys, cid) if public_keys is not None else None)
    if path is None or not path.is_file():
        where = f" ({path} not found)" if path is not None else ""
        raise ProvisionError(f"center {cid}: no public key{where}; the site makes its key pair with "
                             f"`newadj site keygen --center {cid} --out KEYDIR` and sends KEYDIR/{cid}.pub; "
                             "name it as `public_key:` in the federation file or pass --public-keys DIR")
    try:
        load_public_key(path)
    except KeyError_ as exc:
        raise ProvisionError(f"center {cid}: {exc}") from exc
    return path.read_bytes()


def server_cert_matches(cert: x509.Certificate, ca_cert: x509.Certificate, fed: dict, min_days: int = 30) -> bool:
    """Whether an existing server certificate can be kept: issued by this CA, same SANs, not expiring soon."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # noqa: BLE001 - InvalidSignature, wrong key type, ...
        return False
    dns, ips = _san_of(cert)
    if dns != set(fed["superlink"]["dns_names"]) or ips != set(fed["superlink"]["ip_addresses"]):
        return False
    return cert.not_valid_after_utc - _now() > dt.timedelta(days=min_days)


# --------------------------------------------------------------------------- kits


def _center_kit_toml(fed: dict, c: dict) -> str:
    sl = fed["superlink"]
    return "\n".join([
        "# SuperNode startup kit (written by `newadj provision`; `newadj site start --kit . --data SITE_DIR`).",
        "[kit]",
        'kind = "center"',
        f"federation = {_toml_str(fed['federation'])}",
        "",
        "[center]",
        f"center_id = {_toml_str(c['center_id'])}",
        f"display_name = {_toml_str(c['display_name'])}",
        f"role = {_toml_str(c['role'])}",
        "",
        "[superlink]",
        "# Fleet API (HTTPS) of the coordinating center's SuperLink",
        f"address = {_toml_str(sl['address'] + ':' + str(sl['port']))}",
        "",
        "[supernode]",
        "# local Runtime API port of this SuperNode (its ClientApp processes connect here);",
        "# distinct per center so that several centers can also run on one host (demo, tests)",
        f"runtime_port = {9094 + [x['center_id'] for x in fed['centers']].index(c['center_id'])}",
        "",
        "[files]",
        f"root_certificates = {_toml_str(CA_CERT)}",
        "# the public key this center sent; its private key stays at the site (`site start --key`)",
        f"public_key = {_toml_str(NODE_PUB)}",
        "",
    ])


def _coordinator_kit_toml(fed: dict) -> str:
    sl = fed["superlink"]
    lines = [
        "# SuperLink startup kit (written by `newadj provision`; `newadj server start --kit .`).",
        "[kit]",
        'kind = "coordinator"',
        f"federation = {_toml_str(fed['federation'])}",
        "",
        "[superlink]",
        "# the centers' door: nginx on bind_host:port passes the Fleet API (HTTPS) and nothing else;",
        "# the SuperLink itself (Fleet, Control and Runtime API on one port) listens on 127.0.0.1:control_port",
        f"address = {_toml_str(sl['address'] + ':' + str(sl['port']))}",
        f"bind_host = {_toml_str(sl['bind_host'])}",
        f"port = {sl['port']}",
        f"control_port = {sl['control_port']}",
        "",
        "[files]",
        f"ca_cert = {_toml_str(CA_CERT)}",
        f"server_cert = {_toml_str(SERVER_CERT)}",
        f"server_key = {_toml_str(SERVER_KEY)}",
        f"authorized_dir = {_toml_str(AUTHORIZED_DIR)}",
        '# SuperLink state (registered SuperNodes, runs); created by `newadj server start`',
        'state_dir = "state"',
        "",
    ]
    for c in fed["centers"]:
        lines += ["[[centers]]", f"center_id = {_toml_str(c['center_id'])}",
                  f"display_name = {_toml_str(c['display_name'])}", f"role = {_toml_str(c['role'])}",
                  f"public_key = {_toml_str(AUTHORIZED_DIR + '/' + c['center_id'] + '.pub')}", ""]
    return "\n".join(lines)


CENTER_START = """#!/bin/sh
# Start this center's Flower SuperNode: ./start.sh /path/to/site_data_folder
# The site folder is validated first; the SuperNode is not started if it has errors.
set -eu
if [ $# -lt 1 ]; then
    echo "usage: $0 SITE_DATA_DIR" >&2
    exit 2
fi
cd "$(dirname "$0")"
exec newadj site start --kit . --key "${NEWADJ_SITE_KEY:?set NEWADJ_SITE_KEY to this site's supernode.key}" --data "$1"
"""

COORDINATOR_START = """#!/bin/sh
# Start the federation's Flower SuperLink (TLS + SuperNode authentication).
set -eu
cd "$(dirname "$0")"
exec newadj server start --kit .
"""


# --------------------------------------------------------------------------- main entry


def provision(federation_file: str | Path, out_dir: str | Path, only: list[str] | None = None,
              force: bool = False, public_keys: str | Path | None = None) -> dict[str, Any]:
    """Write (or update) the federation's CA, server certificate, key pairs and startup kits.

    Centers' public keys come from the sites (``public_key`` in the federation file, or
    ``public_keys/<center_id>.pub``); no private key of a center is made or held here.
    ``only``: take the (new) public keys of just these centers (they must already be in
    the federation file and a CA must already exist); their kits and the coordinator's
    authorized keys are rewritten, the CA, the server certificate and every other
    center's files are left byte-identical.  Without ``only``, an existing CA is kept
    (a server certificate whose SANs no longer match the file is re-issued by it);
    ``force=True`` starts from a new CA and server certificate.

    Returns a summary: paths and what was created.
    """
    fed = load_federation(federation_file)
    out = Path(out_dir)
    ca_dir = out / CA_DIR
    coord = out / COORDINATOR
    known = {c["center_id"] for c in fed["centers"]}
    summary: dict[str, Any] = {"federation": fed["federation"], "out_dir": str(out), "ca_created": False,
                               "server_cert_issued": False, "keys_generated": [], "centers": {},
                               "coordinator": str(coord), "ca_cert": str(ca_dir / CA_CERT)}
    if only is not None:
        only = list(dict.fromkeys(only))
        unknown = [c for c in only if c not in known]
        if unknown:
            raise ProvisionError(f"not in {federation_file}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if force:
            raise ProvisionError("`only` and `force` cannot be combined (force replaces the CA of every kit)")
        if not (ca_dir / CA_CERT).exists():
            raise ProvisionError(f"{ca_dir / CA_CERT}: no CA yet; provision the whole federation first")

    # every public key the sites sent is checked before anything is written (a refusal leaves no half-made kits)
    public_keys = Path(public_keys) if public_keys else None
    targets = fed["centers"] if only is None else [c for c in fed["centers"] if c["center_id"] in only]
    pubs = {c["center_id"]: _center_public_key(c, public_keys) for c in targets}

    _ensure_dir(out, private=True)
    _ensure_dir(ca_dir, private=True)

    # ---- CA
    ca_exists = (ca_dir / CA_CERT).exists()
    if ca_exists and not force:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        ca_key = (serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
                  if (ca_dir / CA_KEY).exists() else None)
        if ca_key is not None and ca_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                ca_cert.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
            raise ProvisionError(f"{ca_dir}: {CA_KEY} does not belong to {CA_CERT}")
    else:
        if force and ca_exists:
            summary["ca_replaced"] = True
        ca_key, ca_cert = _new_ca(fed["federation"], fed["validity_days"]["ca"])
        _write(ca_dir / CA_KEY, _pem_key(ca_key), 0o600)
        _write(ca_dir / CA_CERT, _pem_cert(ca_cert), 0o644)
        summary["ca_created"] = True
    ca_pem = (ca_dir / CA_CERT).read_bytes()

    # ---- coordinator: server certificate
    _ensure_dir(coord, private=True)
    if only is None:
        keep = False
        if not summary["ca_created"] and (coord / SERVER_CERT).exists() and (coord / SERVER_KEY).exists():
            keep = server_cert_matches(x509.load_pem_x509_certificate((coord / SERVER_CERT).read_bytes()), ca_cert, fed)
        if not keep:
            if ca_key is None:
                raise ProvisionError(f"{ca_dir / CA_KEY} is missing: cannot issue a server certificate "
                                     "(restore the CA key, or pass force=True to start a new CA)")
            skey, scert = _new_server_cert(fed, ca_key, ca_cert)
            _write(coord / SERVER_KEY, _pem_key(skey), 0o600)
            _write(coord / SERVER_CERT, _pem_cert(scert), 0o644)
            summary["server_cert_issued"] = True
        _write_if_changed(coord / CA_CERT, ca_pem)
    summary["server_cert"] = str(coord / SERVER_CERT)

    # ---- centers: the public keys the sites sent
    auth = _ensure_dir(coord / AUTHORIZED_DIR, private=False)
    for c in targets:
        cid = c["center_id"]
        pub = pubs[cid]
        kit = _ensure_dir(out / cid, private=False)
        if (kit / NODE_PUB).exists() and (kit / NODE_PUB).read_bytes() != pub:
            summary["keys_generated"].append(cid)      # a new key for this center (re-keyed at the site)
        elif not (kit / NODE_PUB).exists():
            summary["keys_generated"].append(cid)
        _write_if_changed(kit / NODE_PUB, pub, 0o644)
        _write_if_changed(auth / f"{cid}.pub", pub, 0o644)
        if (kit / NODE_KEY).exists():
            summary.setdefault("warnings", []).append(
                f"{kit / NODE_KEY}: a center private key from an older version of provision; it is no longer "
                "used (the site makes its own with `newadj site keygen`): delete it")
        if only is None:
            _write_if_changed(kit / CA_CERT, ca_pem)
        _write_if_changed(kit / KIT_TOML, _center_kit_toml(fed, c))
        _write_if_changed(kit / START_SH, CENTER_START, 0o755)

    # coordinator's authorized keys: exactly the federation file's centers
    for c in fed["centers"]:
        pub = auth / f"{c['center_id']}.pub"
        if not pub.exists():
            raise ProvisionError(f"{pub} is missing; provision the whole federation (without `only`)")
        summary["centers"][c["center_id"]] = {"kit": str(out / c["center_id"]), "role": c["role"],
                                              "public_key": str(pub)}
    removed = sorted(p.stem for p in auth.glob("*.pub") if p.stem not in known)
    for stem in removed:
        (auth / f"{stem}.pub").unlink()
    summary["removed_from_authorized"] = removed
    _write_if_changed(coord / KIT_TOML, _coordinator_kit_toml(fed))
    _write_if_changed(coord / START_SH, COORDINATOR_START, 0o755)
    return summary


def cmd_provision(federation_file: str | Path, out_dir: str | Path, only: list[str] | None = None,
                  force: bool = False, echo=print, public_keys: str | Path | None = None) -> int:
    """CLI entry (`newadj provision`): returns an exit code, prints what was written."""
    try:
        s = provision(federation_file, out_dir, only=only or None, force=force, public_keys=public_keys)
    except (FederationFileError, ProvisionError) as err:   # bad input: the file, a key, the output folder
        echo(f"provision: {err}")
        return 2
    echo(f"federation {s['federation']}: kits in {s['out_dir']}")
    echo(f"  CA: {s['ca_cert']} ({'new' if s['ca_created'] else 'kept'})"
         + ("  [REPLACED: every kit must be redistributed]" if s.get("ca_replaced") else ""))
    echo(f"  server certificate: {s['server_cert']} ({'issued' if s['server_cert_issued'] else 'kept'})")
    echo(f"  new or changed center public keys: {', '.join(s['keys_generated']) or 'none'}")
    for w in s.get("warnings", []):
        echo(f"  warning: {w}")
    for cid, c in s["centers"].items():
        echo(f"  {cid:<12} {c['role']:<8} {c['kit']}")
    if s["removed_from_authorized"]:
        echo(f"  no longer authorized: {', '.join(s['removed_from_authorized'])}")
    echo(f"  coordinator kit: {s['coordinator']} (keep {Path(s['out_dir']) / CA_DIR / CA_KEY} offline)")
    return 0
