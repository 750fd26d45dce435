"""``blocksketch serve``: the authenticated HTTP query service."""

from __future__ import annotations

import ipaddress
import os
import socket

import click

from sketch.errors import UsageError

from .common import redis_option

DEFAULT_BIND = "127.0.0.1:8470"
TOKEN_ENV = "BLOCKSKETCH_TOKEN"


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536 or not host:
        raise UsageError(f"--bind {bind!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def read_token(token_file: str | None) -> str | None:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --token-file {token_file}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


@click.command("serve")
@click.option("--bind", default=DEFAULT_BIND, show_default=True, help="Address to listen on, HOST:PORT.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help=f"File holding the bearer token clients must send [default: ${TOKEN_ENV}].")
@click.option("--max-body-mib", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Largest request body accepted (larger ones get 413).")
@click.option("--max-connections", type=click.IntRange(1), default=None,
              help="Open connections at most; when full, the one idle longest is closed "
                   "[default: 1024, less if `ulimit -n` is low].")
@click.option("--head-timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="Seconds a client has to send a whole request head, on a new or kept-alive connection.")
@redis_option
def command(bind: str, token_file: str | None, max_body_mib: int, max_connections: int | None,
            head_timeout: float, redis_url: str | None) -> None:
    """Serve ranking, manifests and index status over HTTP (OpenAPI at /openapi.json).

    Every endpoint but /healthz needs 'Authorization: Bearer TOKEN'. Without a token the service
    only listens on a loopback address. SIGTERM stops it cleanly (exit 0).

    \b
    Example:
      echo "$(openssl rand -hex 32)" > /etc/blocksketch/token
      blocksketch serve --bind 0.0.0.0:8470 --token-file /etc/blocksketch/token
      curl -H "Authorization: Bearer $(cat /etc/blocksketch/token)" http://host:8470/v1/hosts
    """
    from server.app import create_app
    from server.connections import fd_limit, limits_for
    from server.runner import listen, serve
    from store import open_store

    host, port = parse_bind(bind)
    token = read_token(token_file)
    if token is None and not is_loopback(host):
        raise UsageError(f"refusing to listen on {host} without a token: use --token-file or ${TOKEN_ENV}")
    try:
        limits = limits_for(fd_limit(), max_connections, head_timeout)
    except ValueError as exc:
        raise UsageError(f"--max-connections: {exc}") from None
    # Bound before the store opens: an address in use fails at once, with nothing started.
    sock = listen(host, port)
    try:
        with open_store(redis_url) as store:
            app = create_app(store, token, max_body_mib << 20)

            def listening() -> None:
                click.echo(f"blocksketch: serving {store.url} on http://{bind}"
                           f" ({'token required' if token else 'no token: loopback only'})", err=True)

            serve(app, sock, limits, listening)
    finally:
        sock.close()
