"""Container health check: exit 0 when ``GET http(s)://127.0.0.1:PORT/PATH`` answers 2xx, else 1.

Used by every fleetloop image's HEALTHCHECK (``/opt/venv/bin/python /opt/fleetloop/healthcheck.py
--port N --path /P``): the slim images have neither curl nor wget; the standard library is enough.

``--tls auto`` (the default) uses HTTPS when ``FLEETLOOP_API_TLS_CERT`` is set, as the control plane
then serves HTTPS only. The probe talks to loopback inside the container, so it checks liveness, not
the certificate: verification is off for that one request.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request


def probe(port: int, path: str, https: bool, timeout: float) -> tuple[bool, str]:
    """(healthy, reason) for one GET of ``path`` on loopback ``port``."""
    url = f"{'https' if https else 'http'}://127.0.0.1:{port}{path}"
    context = ssl._create_unverified_context() if https else None  # loopback liveness only, see module doc
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:  # noqa: S310 (fixed scheme)
            return 200 <= resp.status < 300, f"{url} -> {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url} -> {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url} -> {exc}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--tls", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    https = args.tls == "on" or (args.tls == "auto" and bool(os.environ.get("FLEETLOOP_API_TLS_CERT")))
    ok, reason = probe(args.port, args.path, https, args.timeout)
    print(reason, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
