"""CurveZMQ keys: peers accept only coordinators whose public key they hold.

`meldlite keygen DIR` writes (zmq.auth certificate files, Z85 keys):

    DIR/peer.key_secret          the peers' server key pair     -> every peer board
    DIR/authorized/coordinator.key  client keys peers accept    -> every peer board
    DIR/coordinator.key_secret   the coordinator's key pair     -> the head node
    DIR/peer.key                 the peers' public key          -> the head node
    DIR/coordinator.key          the coordinator's public key (copy of the authorized one)

A peer started with `--keys DIR` uses DIR/peer.key_secret and accepts the
client keys in DIR/authorized/; a coordinator with `--keys DIR` uses
DIR/coordinator.key_secret and expects the peers' DIR/peer.key.
`meldlite keygen DIR --name NAME` adds another pair NAME.key(_secret) (e.g. a
second coordinator: copy NAME.key into the peers' authorized/).

The ZAP authenticator is started before the peer binds: with no ZAP handler
libzmq lets any client that knows the server key in (fail-open).
"""

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq

from meldlite.errors import OptionError

SERVER, CLIENT, AUTHORIZED = "peer", "coordinator", "authorized"


def check_curve():
    if not zmq.has("curve"):
        raise OptionError("this libzmq was built without CURVE security; keys cannot be used")


def keygen(directory, name=None, force=False):
    """Write the key layout above into `directory` (or one pair NAME); returns the paths."""
    check_curve()
    from zmq.auth import create_certificates

    d = Path(directory)
    names = [name] if name else [SERVER, CLIENT]
    for n in names:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", n) or n == AUTHORIZED:
            raise OptionError(f"key name {n!r}: use letters, digits, '_', '.', '-'")
        if not force and (d / f"{n}.key_secret").exists():
            raise OptionError(f"{d / (n + '.key_secret')} exists; pass --force to replace it")
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for n in names:
        pub, sec = create_certificates(str(d), n)
        os.chmod(sec, 0o600)
        written += [Path(pub), Path(sec)]
    if not name:
        auth = d / AUTHORIZED
        auth.mkdir(exist_ok=True)
        target = auth / f"{CLIENT}.key"
        target.write_bytes((d / f"{CLIENT}.key").read_bytes())
        written.append(target)
    return written


def _load(path, need_secret):
    from zmq.auth import load_certificate

    path = Path(path)
    if not path.is_file():
        raise OptionError(f"key file {path} does not exist (see `meldlite keygen`)")
    try:
        public, secret = load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise OptionError(f"key file {path} is not a zmq certificate: {e}") from None
    if need_secret and not secret:
        raise OptionError(f"key file {path} holds no secret key")
    return public, secret


@dataclass(frozen=True)
class ServerKeys:
    """A peer's key pair and the directory of client public keys it accepts."""

    public: bytes
    secret: bytes
    authorized: Path

    @classmethod
    def load(cls, directory, secret_file=None, authorized=None):
        check_curve()
        d = Path(directory)
        public, secret = _load(secret_file or d / f"{SERVER}.key_secret", True)
        auth = Path(authorized or d / AUTHORIZED)
        if not auth.is_dir() or not any(auth.glob("*.key")):
            raise OptionError(f"{auth} holds no client keys (*.key): no coordinator could connect")
        return cls(public, secret, auth)


@dataclass(frozen=True)
class ClientKeys:
    """A coordinator's key pair and the peers' server public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, directory, secret_file=None, server_file=None):
        check_curve()
        d = Path(directory)
        public, secret = _load(secret_file or d / f"{CLIENT}.key_secret", True)
        server_public, _ = _load(server_file or d / f"{SERVER}.key", False)
        return cls(public, secret, server_public)


def as_server_keys(keys):
    return keys if keys is None or isinstance(keys, ServerKeys) else ServerKeys.load(keys)


def as_client_keys(keys):
    return keys if keys is None or isinstance(keys, ClientKeys) else ClientKeys.load(keys)


def start_authenticator(ctx, keys):
    """A ZAP handler accepting the client keys in keys.authorized; call before bind."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    return auth


def secure_server(sock, keys):
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public


def secure_client(sock, keys):
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


_TCP = re.compile(r"^tcp://(\[[^\]]+\]|[^:/]+):(\d+|\*)$")


def split_endpoint(endpoint):
    """(host, port) of "tcp://host:port"; OptionError for anything else."""
    m = _TCP.match(str(endpoint))
    if not m:
        raise OptionError(f"endpoint {endpoint!r} is not tcp://HOST:PORT")
    port = m.group(2)
    if port != "*" and not 0 <= int(port) <= 65535:
        raise OptionError(f"endpoint {endpoint!r}: port out of range")
    return m.group(1).strip("[]"), port


def is_loopback(endpoint):
    """True if a tcp endpoint's host is a loopback address or "localhost"."""
    host, _ = split_endpoint(endpoint)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None)
            )
        except (OSError, ValueError):
            return False


def check_exposure(endpoint, keys, insecure, what):
    """Refuse to bind (or connect) beyond loopback without keys unless `insecure`."""
    if keys is None and not insecure and not is_loopback(endpoint):
        raise OptionError(
            f"{what} {endpoint} is not a loopback address and no keys were given: "
            f"use --keys DIR (see `meldlite keygen`) or --insecure"
        )
