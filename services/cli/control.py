"""Control-plane subcommands of ``fleetloop``: ``up``, ``api``, ``job ...``, ``certs init``, ``admin create-key``.
Release commands (``job releases|promote|abort-release|rollout``) live in :mod:`services.cli.releases`.

``job`` commands talk to the REST API (``--api``, default ``$FLEETLOOP_API`` or
http://127.0.0.1:8000) with the key from ``--key``, ``$FLEETLOOP_API_KEY`` or the local
``runs/controlplane/admin.key`` written by ``fleetloop up``. ``admin create-key`` writes to Redis
directly (it is how the first keys of a deployment are made) and prints the key once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fleetloop.errors import FleetloopError
from services.cli import releases

DEFAULT_DATA = Path("runs/controlplane")


def _key(args: argparse.Namespace) -> str | None:
    if args.key:
        return args.key
    if os.environ.get("FLEETLOOP_API_KEY"):
        return os.environ["FLEETLOOP_API_KEY"]
    local = DEFAULT_DATA / "admin.key"
    return local.read_text().strip() if local.exists() else None


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _print_error(exc: FleetloopError, as_json: bool) -> None:
    """An error on stderr: the usual ``error: ...`` line, or with ``--output json`` one JSON object
    ``{"error": {"code", "message", "field", "value"}}`` (what a script parses; the exit code is 1)."""
    if as_json:
        print(json.dumps({"error": {"code": exc.code, "message": str(exc), "field": exc.field,
                                    "value": exc.value if isinstance(exc.value, (str, int, float, bool, type(None))) else repr(exc.value)}},
                         sort_keys=True), file=sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)


def _cmd_up(args: argparse.Namespace) -> int:
    from services.control.up import UpOptions, run_up
    return run_up(UpOptions(host=args.host, port=args.port, data=Path(args.data), redis_url=args.redis_url,
                            ray_address=args.ray_address, ray_cpus=args.ray_cpus, advertise_host=args.advertise_host,
                            submit=Path(args.submit) if args.submit else None, tls_cert=args.tls_cert, tls_key=args.tls_key))


def _bootstrap_admin_key(store, key: str, wait_s: float = 120.0) -> None:
    """Register ``$FLEETLOOP_ADMIN_KEY`` (admin role) once Redis answers; a deployment's first credential."""
    from fleetloop.errors import Unavailable
    deadline = time.monotonic() + wait_s
    while True:
        try:
            rec = store.ensure_api_key(key.strip(), "admin", "bootstrap")
            print(json.dumps({"event": "bootstrap_admin_key", "key_id": rec.id, "revoked": rec.revoked_at is not None}),
                  file=sys.stderr)
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _cmd_api(args: argparse.Namespace) -> int:
    """The REST API and dashboard alone, over an existing Redis: the control plane's container entry point."""
    import signal

    import uvicorn

    from services.control.api import create_app
    from services.control.state import StateStore
    url = args.redis_url or os.environ.get("REDIS_URL")
    if not url:
        print("error: --redis-url or REDIS_URL is required", file=sys.stderr)
        return 2
    store = StateStore(url)
    if os.environ.get("FLEETLOOP_ADMIN_KEY"):
        try:
            _bootstrap_admin_key(store, os.environ["FLEETLOOP_ADMIN_KEY"])
        except FleetloopError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.launcher == "kubernetes":
        from services.control.launchers.k8s_reconciler import KubernetesLauncher
        launcher = KubernetesLauncher.from_environment(store, namespace=args.namespace)
    elif args.launcher == "local":
        from services.control.launchers.local import LocalLauncher
        launcher = LocalLauncher(store, Path(args.data), ray_address=args.ray_address, advertise_host=args.advertise_host)
    else:
        from services.control.launchers.hold import HoldLauncher
        launcher = HoldLauncher(store)
    server = uvicorn.Server(uvicorn.Config(create_app(store, launcher), host=args.host, port=args.port, log_level="warning",
                                           access_log=False, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_job(args: argparse.Namespace) -> int:
    """``fleetloop job ...``. With ``--output json`` every command prints JSON on stdout (``list``: an
    array; ``status --watch``: one object per line, NDJSON) and errors as one JSON object on stderr."""
    from services.control.client import ApiClient, load_spec
    as_json = args.output == "json"
    api = ApiClient(args.api, _key(args))
    try:
        if args.job_cmd == "submit":
            job = api.submit(load_spec(Path(args.file)))
            if as_json:
                _print(job)
            else:
                print(f"submitted {job['id']} (state {job['state']})")
        elif args.job_cmd == "list":
            rows = api.jobs()
            if as_json:
                _print(rows)
                return 0
            print(f"{'JOB':32} {'STATE':10} {'VERSION':>7} {'ROBOTS':>6}  TASKS")
            for j in rows:
                version = (j.get("status") or {}).get("version", "-")
                print(f"{j['id']:32} {j['state']:10} {version!s:>7} {j['fleet_robots']:>6}  {','.join(j['spec']['tasks'])}")
        elif args.job_cmd == "status":
            job = api.job(args.job_id)
            if args.watch:
                while True:
                    s = job.get("status") or {}
                    if as_json:
                        print(json.dumps({"time": time.time(), "state": job["state"], "version": s.get("version"),
                                          "step": s.get("step"), "episodes_total": s.get("episodes_total"),
                                          "fleet_robots": job["fleet_robots"]}, sort_keys=True), flush=True)
                    else:
                        print(f"{time.strftime('%H:%M:%S')} {job['state']:8} v{s.get('version', '-')} step {s.get('step', '-')} "
                              f"episodes {s.get('episodes_total', '-')} robots {job['fleet_robots']}", flush=True)
                    if job["state"] in ("stopped", "failed"):
                        break
                    time.sleep(args.watch)
                    job = api.job(args.job_id)
            else:
                _print({**job, "actors": api.actors(args.job_id)})
        elif args.job_cmd in ("stop", "pause", "resume"):
            _print(api.action(args.job_id, args.job_cmd))
        elif args.job_cmd in ("pin", "rollback"):
            _print(api.policy_action(args.job_id, args.version, args.job_cmd))
        elif args.job_cmd == "evaluate":
            _print(api.call("POST", f"/v1/jobs/{args.job_id}/policies/{args.version}/evaluate", params={"trials": args.trials}))
        elif args.job_cmd == "unpin":
            _print(api.policy_action(args.job_id, None, "unpin"))
        elif args.job_cmd in releases.COMMANDS:
            return releases.run(api, args, as_json, _print)
        elif args.job_cmd == "enroll":
            e = api.enroll(args.job_id, args.name, args.actors.split(",") if args.actors else None)
            if as_json:
                _print(e)
            else:
                print(f"robot token for {args.name} (enrollment {e['id']}); shown once:\n{e['token']}")
    except FleetloopError as exc:
        _print_error(exc, as_json)
        return 1
    return 0


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from fleetloop.tls import init_certs
    try:
        files = init_certs(Path(args.out), [h.strip() for h in args.hosts.split(",") if h.strip()], force=args.force)
    except FleetloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a local CA and certificates for {args.hosts} to {args.out}:")
    for role, path in files.items():
        print(f"  {role:11} {path}")
    print("learner: tls_cert_file=server.pem tls_key_file=server.key (+ tls_client_ca_file=ca.pem for mTLS); "
          "robots: --tls-ca ca.pem (+ --tls-cert client.pem --tls-key client.key); API: --tls-cert/--tls-key")
    return 0


def _cmd_admin_create_key(args: argparse.Namespace) -> int:
    from services.control.state import StateStore
    url = args.redis_url or os.environ.get("REDIS_URL")
    local = DEFAULT_DATA / "redis.url"
    if not url and local.exists():
        url = local.read_text().strip()
    if not url:
        print("error: --redis-url or REDIS_URL is required (fleetloop up prints the embedded Redis URL)", file=sys.stderr)
        return 2
    try:
        key, rec = StateStore(url).create_api_key(args.role, args.name)
    except FleetloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{rec.role} key {rec.id} ({rec.name}); shown once:\n{key}")
    return 0


def add_control_commands(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="control plane on this machine: Redis (embedded), Ray, REST API and dashboard")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--data", default=str(DEFAULT_DATA), help="state folder (Redis data, job state, admin key)")
    up.add_argument("--redis-url", default=None, help="external Redis (default $REDIS_URL, else embedded)")
    up.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start Ray locally)")
    up.add_argument("--ray-cpus", type=int, default=None)
    up.add_argument("--advertise-host", default="127.0.0.1", help="host robots use to reach learners started here")
    up.add_argument("--submit", default=None, help="JobSpec YAML/JSON to submit once the API is up")
    up.add_argument("--tls-cert", default=None, help="serve the API over HTTPS with this PEM certificate")
    up.add_argument("--tls-key", default=None, help="private key of --tls-cert")
    up.set_defaults(func=_cmd_up)

    ap = sub.add_parser("api", help="REST API and dashboard only, over an existing Redis (container entry point)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--redis-url", default=None, help="Redis URL (default $REDIS_URL)")
    ap.add_argument("--launcher", choices=["kubernetes", "local", "hold"], default="kubernetes",
                    help="who starts learners: Kubernetes objects (in a cluster), local Ray, or nobody (hold)")
    ap.add_argument("--namespace", default=os.environ.get("FLEETLOOP_NAMESPACE"), help="namespace for job objects (kubernetes)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="state folder (local launcher)")
    ap.add_argument("--ray-address", default=None, help="Ray cluster (local launcher)")
    ap.add_argument("--advertise-host", default="127.0.0.1", help="host robots use to reach learners (local launcher)")
    ap.add_argument("--tls-cert", default=os.environ.get("FLEETLOOP_API_TLS_CERT"), help="serve HTTPS with this PEM certificate")
    ap.add_argument("--tls-key", default=os.environ.get("FLEETLOOP_API_TLS_KEY"), help="private key of --tls-cert")
    ap.set_defaults(func=_cmd_api)

    job = sub.add_parser("job", help="submit and steer jobs through the REST API")
    job.add_argument("--api", default=os.environ.get("FLEETLOOP_API", "http://127.0.0.1:8000"))
    job.add_argument("--key", default=None, help="API key (default $FLEETLOOP_API_KEY or runs/controlplane/admin.key)")
    output_help = "text (for people, default) or json (for scripts: JSON on stdout, errors as JSON on stderr)"
    job.add_argument("--output", "-o", choices=["text", "json"], default="text", help=output_help)
    jsub = job.add_subparsers(dest="job_cmd", required=True)
    s = jsub.add_parser("submit", help="submit a JobSpec (YAML or JSON)")
    s.add_argument("file")
    jsub.add_parser("list", help="list jobs")
    st = jsub.add_parser("status", help="a job's record, learner status and fleet")
    st.add_argument("job_id")
    st.add_argument("--watch", type=float, default=0, help="print a line every N seconds until the job ends")
    for name in ("stop", "pause", "resume", "unpin"):
        c = jsub.add_parser(name, help=f"{name} a job" if name != "unpin" else "let the fleet follow the newest version")
        c.add_argument("job_id")
    for name, text in (("pin", "pin the fleet to a version"), ("rollback", "continue training from a version")):
        c = jsub.add_parser(name, help=text)
        c.add_argument("job_id")
        c.add_argument("version", type=int)
    ev = jsub.add_parser("evaluate", help="evaluate a version on held-out seeds (results in `job status` policies)")
    ev.add_argument("job_id")
    ev.add_argument("version", type=int)
    ev.add_argument("--trials", type=int, default=20)
    en = jsub.add_parser("enroll", help="issue a robot token for a job (printed once)")
    en.add_argument("job_id")
    en.add_argument("name")
    en.add_argument("--actors", default=None, help="comma-separated actor ids (glob patterns) the token may act as "
                    "(default: exactly NAME)")
    releases.add_release_commands(jsub)
    for c in jsub.choices.values():
        c.add_argument("--output", "-o", choices=["text", "json"], default=argparse.SUPPRESS, help=output_help)
        c.set_defaults(func=_cmd_job)

    certs = sub.add_parser("certs", help="TLS material")
    csub = certs.add_subparsers(dest="certs_cmd", required=True)
    ci = csub.add_parser("init", help="make a local CA and server/client certificates (keys mode 0600)")
    ci.add_argument("--out", default="runs/certs")
    ci.add_argument("--hosts", default="localhost,127.0.0.1", help="comma-separated DNS names / IPs of the server certificate")
    ci.add_argument("--force", action="store_true", help="replace existing files")
    ci.set_defaults(func=_cmd_certs_init)

    adm = sub.add_parser("admin", help="administration (direct Redis access)")
    asub = adm.add_subparsers(dest="admin_cmd", required=True)
    ck = asub.add_parser("create-key", help="create an API key and print it once")
    ck.add_argument("--role", choices=["admin", "operator", "viewer"], required=True)
    ck.add_argument("--name", default="cli")
    ck.add_argument("--redis-url", default=None)
    ck.set_defaults(func=_cmd_admin_create_key)
