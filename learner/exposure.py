"""Who can reach a learner, and what address robots should use.

Contract (issue 17, item 1): a learner without credentials (no ``robot_tokens``, no enrollment
store, no mTLS client CA) serves loopback only. A non-loopback bind without credentials is refused
at start-up (config validation) with an error naming ``host`` and ``robot_tokens``, unless
``allow_unauthenticated = true``: then the learner starts, logs a warning, and exports
``fleetloop_learner_unauthenticated{job} = 1`` (also 1 for an open loopback learner; 0 when every
RPC needs a credential).

:func:`advertised_host` answers "which host do robots dial?" for a learner bound to ``host``:
``advertise_host`` when set, the bound address when it is a specific one, and for a wildcard bind
(``0.0.0.0`` / ``::``) the address of the interface that routes off this machine (no packet is sent),
or the host name's address when there is no route.
"""

from __future__ import annotations

import ipaddress
import socket

WILDCARDS = ("0.0.0.0", "::", "")
_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address or name (a wildcard or any other name is not)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, robot_tokens: list[str], enrollments: bool, mtls: bool,
                     allow_unauthenticated: bool) -> str | None:
    """Why this learner must not start (None: it may). See the module docstring."""
    if robot_tokens or enrollments or mtls or allow_unauthenticated or is_loopback(host):
        return None
    return (f"host {host!r} serves beyond loopback but robot_tokens is empty (and no control_redis_url enrollment "
            f"store or tls_client_ca_file): anyone who reaches this port could stream experience and read weights. "
            f"Set robot_tokens (or enroll robots through the control plane), bind host '127.0.0.1', or set "
            f"allow_unauthenticated = true to accept anonymous callers on purpose")


def route_address() -> str | None:
    """The local address of the interface with a route off this machine (UDP connect sends nothing);
    None without a non-loopback route."""
    for family, probe in ((socket.AF_INET, ("192.0.2.1", 9)), (socket.AF_INET6, ("2001:db8::1", 9))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(probe)
                addr = s.getsockname()[0]
        except OSError:
            continue
        if not is_loopback(addr):
            return addr
    return None


def advertised_host(host: str, advertise_host: str | None = None) -> str:
    """The host robots should dial for a learner bound to ``host`` (module docstring)."""
    if advertise_host:
        return advertise_host
    if host not in WILDCARDS:
        return host
    found = route_address()
    if found:
        return found
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def target(host: str, port: int) -> str:
    """``host:port`` as a gRPC target (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
