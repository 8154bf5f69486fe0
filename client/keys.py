"""The center's SuperNode authentication key pair, made at the site (``newadj site keygen``).

The private key never leaves the site: it is written with owner-only permissions
(file 0600 in a 0700 folder) and only the public key goes to the coordinator, who
registers it with the SuperLink (``newadj provision --public-keys``).  The format is
what Flower 1.41 reads: an EC key on NIST P-384, the private key in OpenSSH format
(``flower-supernode --auth-supernode-private-key``) and the public key as an OpenSSH
line (``flwr supernode register``).  Re-keying a center is a new ``keygen --force`` at
that site and ``newadj provision --only CENTER`` at the coordinator; no other center's
key or kit changes.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

AUTH_CURVE = ec.SECP384R1
PRIVATE_KEY = "supernode.key"


class KeyError_(ValueError):
    """A key file that is missing, unreadable, of the wrong kind or readable by others."""


def public_key_file(out_dir: Path, center_id: str) -> Path:
    return Path(out_dir) / f"{center_id}.pub"


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``path`` atomically with ``mode`` set before any byte lands (a private file is never readable by others)."""
    if isinstance(data, str):
        data = data.encode()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)              # before any byte lands
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(path, mode)


def keygen(out_dir: Path, center_id: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``OUT/supernode.key`` (0600) and ``OUT/<center_id>.pub``; refuses to replace a key unless ``force``."""
    out = Path(out_dir)
    priv_path, pub_path = out / PRIVATE_KEY, public_key_file(out, center_id)
    if priv_path.exists() and not force:
        raise KeyError_(f"{priv_path}: a key already exists (re-key with --force, then send the new "
                        f"{pub_path.name} to the coordinator)")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    key = ec.generate_private_key(AUTH_CURVE())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write(priv_path, priv, 0o600)
    atomic_write(pub_path, pub + f" {center_id}\n".encode(), 0o644)
    return priv_path, pub_path


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise KeyError_(f"{path}: not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyError_(f"{path}: an {type(key).__name__}; Flower needs an EC (NIST curve) key")
    return key


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    if not path.is_file():
        raise KeyError_(f"{path}: no such private key (make one with `newadj site keygen`)")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyError_(f"{path}: permissions {oct(mode)} let others read the private key; run `chmod 600 {path}`")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"{path}: not an OpenSSH private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyError_(f"{path}: an {type(key).__name__}; Flower needs an EC (NIST curve) key")
    return key


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the key's OpenSSH encoding, as ``SHA256:<hex prefix>`` (for messages and logs)."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return "SHA256:" + hashlib.sha256(blob).hexdigest()[:32]


def same_key(private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey) -> bool:
    return private_key.public_key().public_numbers() == public_key.public_numbers()
