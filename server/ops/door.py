"""The coordinator's door: the SuperLink on loopback, Debian's nginx in front passing the Fleet API only.

Flower's SuperLink serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``ls``,
``stop``, ``log``, ``supernode register`` / ``unregister``) and the ServerApp's Runtime API on one
port, and the open-source release authenticates no Control API account: anyone who reaches the
port can submit a run, list runs and register or remove SuperNodes.  So ``newadj server start``
binds the SuperLink to the coordinator host's loopback (``127.0.0.1:control_port``, TLS) and puts
nginx on the federation's address (``bind_host:port``, the address in every center kit):

* nginx terminates TLS with the SuperLink's certificate (the one the centers' CA vouches for),
  forwards ``/v1/fleet/`` to the SuperLink over TLS (verifying it with the federation's CA), and
  answers every other path 403;
* the SuperNodes' authentication is untouched: their signed headers pass through;
* the Control API is reachable from the coordinator's host only: its operator's ``flwr`` CLI (the
  coordinator kit's ``state/flwr-home``) dials ``127.0.0.1:control_port``.

Anyone with a shell on the coordinator's host is its operator; see ``deploy/OPERATOR.md``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

FLEET_PREFIX = "/v1/fleet/"
NGINX = "nginx"


class DoorError(RuntimeError):
    """nginx is missing or its configuration cannot be written."""


def nginx_binary() -> str:
    """Debian's nginx (``apt-get install nginx``): on the PATH or in /usr/sbin."""
    found = shutil.which(NGINX) or (str(Path("/usr/sbin/nginx")) if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise DoorError("nginx is not installed; the coordinator's door needs Debian's nginx "
                        "(`apt-get install nginx`)")
    return found


def nginx_config(state: Path, host: str, port: int, upstream_port: int, cert: Path, key: Path, ca: Path) -> str:
    """nginx's configuration for the door (``state``: a private folder for its pid, logs and temp files)."""
    state = Path(state)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    tmp = state / "nginx-tmp"
    return f"""# written by `newadj server start` (server/ops/door.py): the Fleet API only, on the federation's address
daemon off;
worker_processes 1;
pid {state / "nginx.pid"};
error_log {state / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {state / "nginx-access.log"};
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    # model weights travel in request and response bodies: streamed, never buffered to disk
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;
    server_tokens off;
    upstream superlink {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location {FLEET_PREFIX} {{
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        location / {{
            return 403 "only the Fleet API is served on this address\\n";
        }}
    }}
}}
"""


def nginx_command(kit, state: Path, host: str, port: int, upstream_port: int) -> list[str]:
    """``nginx`` in the foreground with the door's configuration (written into ``state``)."""
    state = Path(state)
    (state / "nginx-tmp").mkdir(parents=True, exist_ok=True)
    conf = state / "nginx.conf"
    conf.write_text(nginx_config(state, host, port, upstream_port, kit.file("server_cert"), kit.file("server_key"),
                                 kit.file("ca_cert")))
    return [nginx_binary(), "-p", str(state), "-c", str(conf), "-e", str(state / "nginx-error.log")]
