"""The site's runtime: the ClientApp installed at the site, warm, serving the site's own SuperNode.

``flower-supernode --isolation process`` keeps each message it pulls as a task and leaves it to an
executor that claims it through the SuperNode's app I/O (Runtime) API.  Flower's own executor
(``flower-superexec``) would install the run's app bundle and start a fresh ``flwr-clientapp``
process for every message, so the code that ran at the site was whatever the coordinator shipped.
This process is the site's executor instead (``newadj site start`` starts it beside the SuperNode):

* It claims tasks (``AcquireTask``, signed with the site's SuperExec secret, so that no other
  process on the host can claim them), pulls the message, context, run and bundle, and pushes the
  reply and the context back, with heartbeats while it works: what Flower's ``flwr-clientapp``
  does (``flwr/supernode/runtime/run_clientapp.py``), without installing or importing the bundle.
* It runs ``client.client_app.app`` of the newadj version installed at the site; the policy
  defaults it applies are the installed ``conf/policy/default.yaml``.  The node config is the
  site's own (``--data``, ``--center``, ``--role``), whatever the SuperNode was told.
* It admits a run only if its bundle is one the site approved (``client/bundles.admit``); anything
  else is answered with error 412 and an audit entry, and the ClientApp never sees the message.
* It stays warm: what the first message of a run loaded (torch, the site's datasets) serves the
  next ones.  After each message it collects garbage and returns freed memory to the system; when
  its resident memory is still above the site's ``runtime_max_rss_mb`` it exits after replying,
  and its supervisor (this same command without ``--worker``) starts a fresh one.
* A message whose handling fails is answered with an error category (``client/errors.py``) and
  the next message is served as if nothing happened; a worker that dies is restarted.

``python -m client.executor`` is the site (``newadj site start`` runs it): it starts the SuperNode and
the runtime, restarts the runtime when needed, and stops both together::

    python -m client.executor --superlink coordinator.example.org:9093 --root-certificates ca.pem \
        --auth-key supernode.key --runtime-port 9094 --data SITE_DIR --center center_a --role train
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("newadj.executor")

EXIT_RECYCLE = 75          # the worker exits after a reply above its memory bound: start a fresh one
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
POLL_SECONDS = 0.05        # how soon an idle runtime asks its SuperNode again for a task (a loopback call) ...
IDLE_POLL_MAX = 0.25       # ... growing to this while no task comes


@dataclass(frozen=True)
class Site:
    """The site this runtime serves: its own folder, center id, role (and audit folder)."""

    site_dir: Path
    center: str
    role: str
    audit_dir: str | None = None

    @property
    def node_config(self) -> dict:
        cfg = {"data-dir": str(self.site_dir), "role": self.role, "center-id": self.center}
        if self.audit_dir:
            cfg["audit-dir"] = str(self.audit_dir)
        return cfg


def _http_client(address: str, interceptors: list):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=make_simple_http_retry_invoker())


def _heartbeat_fn(client, lost: threading.Event):
    """Flower's task heartbeat, except that a refused heartbeat marks the task lost instead of sending this
    long-lived process SIGINT (``flwr.supercore.heartbeat.make_task_heartbeat_fn_http``)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def fn() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        if not res.success:
            lost.set()
        return True

    return fn


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so that resident memory
    follows what the runtime keeps, not what one message once needed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def refuse_run(message, context, site: Site, code: int, reason: str):
    """The reply to a message of a run this site does not take part in, written to the audit log (the
    ClientApp and its mods never see the message)."""
    from flwr.app import Error, Message

    from client.audit import append_line, audit_path, audit_record
    from client.errors import error_reason

    reply = Message(Error(code=code, reason=error_reason(code, reason)), reply_to=message)
    path = audit_path(site.site_dir, context.node_config)
    append_line(path, audit_record("in", message, context, site.center))
    append_line(path, audit_record("out", reply, context, site.center, decision="refused", error_code=code,
                                   reason=reply.error.reason))
    log.warning("refused a %s message of run %s: %s", message.metadata.message_type, context.run_id, reason)
    return reply


def answer(app, message, context, run, fab, site: Site):
    """The reply of this site to one message: refused unless the run's bundle is approved, else the app's."""
    from client.bundles import admit
    from client.errors import error_reply
    from common.data.policy import PolicyError, load_policy
    from common.federation.reply_schema import ERR_BUNDLE, ERR_REFUSED

    try:
        reason = admit(load_policy(site.site_dir), run.fab_id, run.fab_version, fab.content)
    except PolicyError:
        log.exception("policy file of %s unusable: refusing every run", site.center)
        return refuse_run(message, context, site, ERR_REFUSED, "this site's policy file is unusable")
    if reason is not None:
        return refuse_run(message, context, site, ERR_BUNDLE, reason)
    try:
        return app(message=message, context=context)
    except Exception as exc:   # noqa: BLE001 - the app's own error mod answers handler failures; this is the rest
        return error_reply(message, exc)


def pull_task_input(client):
    """(message, context, run, bundle) of the claimed task: Flower's ``run_clientapp.pull_task_input``, except
    that the message's objects, which the SuperNode may still be receiving, are retried after 0.05 s rather
    than Flower's 1 s first back-off."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode holds no message for this task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.05, backoff_cap=0.5)
    message.metadata.__dict__["_message_id"] = tree.object_id    # as Flower's: the deflated message lacks its id
    return message, context, run, fab


def handle_task(address: str, token: str, site: Site, app) -> bool:
    """Serve one claimed task (one message) the way Flower's ``flwr-clientapp`` would; True if it was answered."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    from client import timing

    timing.begin_message()
    client = _http_client(address, [RuntimeTokenHttpInterceptor(token)])
    lost = threading.Event()
    heartbeat = HeartbeatSender(_heartbeat_fn(client, lost))
    heartbeat.start()
    context, status, details, answered = None, SubStatus.FAILED, "task failed at the site", False
    t0 = time.perf_counter()
    try:
        message, context, run, fab = pull_task_input(client)
        context.node_config = site.node_config
        timing.mark("app_import_start")     # the message is here: what follows is the site's work
        t1 = time.perf_counter()
        reply = answer(app, message, context, run, fab, site)
        t2 = time.perf_counter()
        if lost.is_set():
            details = "the SuperNode gave the task up before the reply was ready"
        else:
            push_message(client, reply, context)
            status, details, answered = SubStatus.COMPLETED, "", True
        log.info("%s message of run %s: pulled in %.2f s, answered in %.2f s, pushed in %.2f s",
                 message.metadata.message_type, context.run_id, t1 - t0, t2 - t1, time.perf_counter() - t2)
    except Exception:   # noqa: BLE001 - a broken task must not end the runtime
        log.exception("task could not be served")
    finally:
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    return answered


def installed_app():
    """The ClientApp of the newadj package installed at this site (never a bundle's)."""
    from client.client_app import app

    return app


def serve(address: str, secret: bytes, site: Site, poll: float = POLL_SECONDS, stop: threading.Event | None = None,
          max_messages: int | None = None, max_rss_mb: float | None = None) -> int:
    """Claim and answer this site's tasks until ``stop`` (or SIGTERM); returns the exit code.

    ``EXIT_RECYCLE`` after a message that left resident memory above ``max_rss_mb`` (default: the
    site policy's ``runtime_max_rss_mb``; 0: no bound)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    from common.data.policy import PolicyError, load_policy

    from client import site_runtime

    stop = stop or threading.Event()
    app = installed_app()
    site_runtime.RUNS_KEPT = 2          # this run and the one before: memory follows the site, not the run count
    control = _http_client(address, [SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE})])
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    handled, waiting_since, idle = 0, None, poll
    log.info("site runtime of %s (%s) serving %s", site.center, site.role, address)
    try:
        while not stop.is_set():
            try:
                res = control.AcquireTask(request)
            except httpx.HTTPError as exc:      # the SuperNode is not up yet, or restarting
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.info("waiting for the SuperNode at %s (%s)", address, type(exc).__name__)
                stop.wait(1.0)
                continue
            waiting_since = None
            if not (res.HasField("task") and res.token):
                stop.wait(idle)
                idle = min(idle * 1.5, IDLE_POLL_MAX)     # quick after a message, calmer while idle
                continue
            idle = poll
            handle_task(address, res.token, site, app)
            handled += 1
            release_memory()
            if max_rss_mb is None:
                try:
                    limit = load_policy(site.site_dir).runtime_max_rss_mb
                except PolicyError:
                    limit = 0
            else:
                limit = max_rss_mb
            rss = rss_mb()
            if limit and rss > limit:
                log.warning("resident memory %.0f MiB above runtime_max_rss_mb %d after a message: restarting "
                            "the runtime", rss, limit)
                return EXIT_RECYCLE
            if max_messages is not None and handled >= max_messages:
                return 0
    finally:
        control.close()
    return 0


# --------------------------------------------------------------------------- the site's processes


def _die_with_parent() -> None:
    """In a child: receive SIGTERM when the site process dies, however it dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supernode_command(args, secret_file: Path) -> list[str]:
    """``flower-supernode`` in process isolation: its app I/O API on loopback, claimable only with the secret."""
    import json

    site = Site(args.data.resolve(), args.center, args.role, args.audit_dir)
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in site.node_config.items())
    # Flower's flower-supernode, its fixed waits shortened (client/supernode.py)
    cmd = [sys.executable, "-m", "client.supernode", "--superlink", args.superlink, "--node-config",
           node_config, "--isolation", "process", "--host", "127.0.0.1",
           "--port", str(args.runtime_port), "--superexec-auth-secret-file", str(secret_file)]
    if args.insecure:
        return cmd + ["--insecure"]
    cmd += ["--root-certificates", str(args.root_certificates)]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(args.auth_key)]
    return cmd


def worker_command(args, secret_file: Path) -> list[str]:
    cmd = [sys.executable, "-m", "client.executor", "--worker", "--runtime", f"127.0.0.1:{args.runtime_port}",
           "--secret-file", str(secret_file), "--data", str(args.data), "--center", args.center, "--role", args.role]
    return cmd + (["--audit-dir", str(args.audit_dir)] if args.audit_dir else [])


def run_site(args) -> int:
    """The site: its SuperNode and its warm runtime, until SIGTERM / SIGINT or the SuperNode ends.

    A fresh random SuperExec secret for each start, in a folder only this user can read, shared with
    the two children and removed at the end: no other process can claim this site's tasks.  The
    runtime is restarted when it recycles itself for memory or dies; the SuperNode's exit ends the site."""
    import secrets
    import shutil
    import tempfile

    private = Path(tempfile.mkdtemp(prefix="newadj-site-"))
    secret = private / "superexec.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_bytes(32))
    os.close(fd)
    stopping: list[int] = []
    procs: dict[str, subprocess.Popen] = {}

    def on_signal(signum, _frame):
        stopping.append(signum)
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    recent: list[float] = []
    try:
        procs["supernode"] = subprocess.Popen(supernode_command(args, secret), preexec_fn=_die_with_parent)
        procs["runtime"] = subprocess.Popen(worker_command(args, secret), preexec_fn=_die_with_parent)
        while not stopping:
            time.sleep(0.2)
            if procs["supernode"].poll() is not None:
                log.error("the SuperNode exited with code %s; stopping the site", procs["supernode"].returncode)
                return procs["supernode"].returncode or 1
            rc = procs["runtime"].poll()
            if rc is None or stopping:
                continue
            now = time.monotonic()
            recent = [t for t in recent if now - t < 60] + [now]
            if rc == EXIT_RECYCLE:
                log.info("site runtime recycled for memory; starting a fresh one")
            else:
                log.error("site runtime exited with code %s; restarting it", rc)
            if len(recent) > 5:
                log.error("site runtime ended %d times within a minute; stopping the site", len(recent))
                return 1
            procs["runtime"] = subprocess.Popen(worker_command(args, secret), preexec_fn=_die_with_parent)
        return 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(private, ignore_errors=True)


# --------------------------------------------------------------------------- the command


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m client.executor", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="the site folder")
    ap.add_argument("--center", required=True)
    ap.add_argument("--role", required=True, choices=("train", "external"))
    ap.add_argument("--audit-dir", default=None)
    ap.add_argument("--superlink", help="the SuperLink's Fleet API, HOST:PORT")
    ap.add_argument("--runtime-port", type=int, help="the SuperNode's app I/O port on 127.0.0.1")
    ap.add_argument("--root-certificates", type=Path, help="the federation's CA (TLS to the SuperLink)")
    ap.add_argument("--auth-key", type=Path, help="the site's SuperNode key (SuperNode authentication)")
    ap.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runtime", help=argparse.SUPPRESS)
    ap.add_argument("--secret-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker and not (args.runtime and args.secret_file):
        ap.error("--worker needs --runtime and --secret-file")
    if not args.worker and not (args.superlink and args.runtime_port and (args.insecure or args.root_certificates)):
        ap.error("the site needs --superlink, --runtime-port and --root-certificates (or --insecure)")
    return args


def _worker(args) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    secret = args.secret_file.read_bytes()
    site = Site(args.data.resolve(), args.center, args.role, args.audit_dir)
    return serve(args.runtime, secret, site, stop=stop)


def main(argv: list[str] | None = None) -> int:
    args = _args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # one line per Runtime API call otherwise
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    return _worker(args) if args.worker else run_site(args)


if __name__ == "__main__":
    sys.exit(main())
