"""`smearscope dashboard`: serve the clinic dashboard (service.dashboard) until interrupted."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import sys

logger = logging.getLogger(__name__)


#: Sysexits EX_UNAVAILABLE: it cannot listen on the port or address (taken, not up yet); the unit
#: tries again. A mistake in the command (options, broker URL, password file) exits 2, which it does not.
EXIT_CANNOT_LISTEN = 69


def _password(args: argparse.Namespace) -> str | None:
    """From --password-file, else the systemd credential 'dashboard-mqtt-password' if present. An empty
    one (the file install-dashboard.sh makes, not yet written) is none: the page asks for the password,
    where with "" it would be refused by the broker every second without asking."""
    from smearscope.service.mqtt.credentials import password_file_or_credential

    return password_file_or_credential(args.password_file, "dashboard-mqtt-password") or None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _network_address() -> str | None:
    """This machine's IPv4 address on the network its default route leads to (a UDP socket's
    connect sends nothing); None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0" else address


def page_url(bind: str, port: int) -> str:
    """The address to open: listening on every address (0.0.0.0, ::), this machine's name, which
    browsers elsewhere can reach and the host check answers (http://0.0.0.0:8080/ reaches nothing
    from another machine, and browsers refuse it); an IPv6 address in brackets."""
    if bind in ("", "0.0.0.0", "::"):
        address = _network_address()
        # the name may resolve nowhere else on the lab network (a Jetson's "ubuntu"): the address too
        alternative = f"or http://{address}:{port}/; " if address else ""
        return (f"http://{socket.gethostname()}:{port}/ ({alternative}listening on every address of this "
                f"machine; on it: http://localhost:{port}/)")
    # a zone (fe80::1%eth0) is written %25eth0 in a URL (RFC 6874)
    return f"http://[{bind.replace('%', '%25')}]:{port}/" if ":" in bind else f"http://{bind}:{port}/"


def cmd_dashboard(args: argparse.Namespace) -> int:
    from smearscope.service.dashboard.server import DashboardServer, DashboardSettings

    if args.password_file is not None and not args.username:
        print("smearscope dashboard: --password-file needs --username (the broker account it is the password of)",
              file=sys.stderr)
        return 2
    args.bind = args.bind.removeprefix("[").removesuffix("]")  # [::1], as a URL writes it
    # a name to --bind is the address printed to open: the page answers it without --host again
    hosts = (*args.host, args.bind) if args.bind and not _is_ip(args.bind) else tuple(args.host)
    try:
        settings = DashboardSettings(args.broker, args.topic_prefix, args.username,
                                     _password(args) if args.username else None, hosts,
                                     run_control=args.run_control)
    except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: CredentialError
        print(f"smearscope dashboard: {exc}", file=sys.stderr)
        return 2
    try:
        server = DashboardServer(settings, args.port, args.bind)
    except OSError as exc:  # a port or address it cannot listen on, which may pass: the unit retries
        if exc.errno == errno.EADDRINUSE:
            exc = OSError(f"port {args.port} on {args.bind} is taken (another dashboard, or another "
                          "server): choose another with --port")
        elif isinstance(exc, socket.gaierror):  # "[Errno -2] Name or service not known"
            exc = OSError(f"--bind {args.bind}: no such host here (an address of this machine, or a name it "
                          "resolves to one)")
        elif exc.errno == errno.EADDRNOTAVAIL:
            exc = OSError(f"--bind {args.bind}: no address of this machine (ip -brief address lists them)")
        print(f"smearscope dashboard: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    print(f"smearscope dashboard: {page_url(args.bind, server.port)} (broker {args.broker})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0
