"""Optional CurveZMQ authentication and encryption for the producer -> trainer link.

The trainer's ROUTER socket is always the Curve *server* (whichever side binds) and every
producer is a Curve *client*. The server accepts a client only when its public key is in an
authorized list, checked by a ZAP handler (pyzmq's ``ThreadAuthenticator``) in the socket's
context. A client without Curve, with an unknown key, or with the wrong server key never
completes the handshake, so none of its messages reaches the trainer's decoder.

Keys are ZeroMQ certificate files, as written by ``zmq.auth.create_certificates``:
``NAME.key`` holds the public key (share it), ``NAME.key_secret`` the public and the secret
key (mode 0600, keep it on the host that uses it). Generate them with::

    python -m shared.curve keygen KEYS_DIR trainer producer-1 producer-2

then start the trainer with ``--curve-secret-key KEYS_DIR/trainer.key_secret
--curve-authorized-keys DIR_OF_PRODUCER_PUBLIC_KEYS`` and each producer with
``--curve-secret-key KEYS_DIR/producer-1.key_secret --curve-server-key KEYS_DIR/trainer.key``.

This module is the one place in ``shared`` that imports zmq (both sides already do).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

ZAP_DOMAIN = "linepack"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class CurveKeyError(ValueError):
    """A key file is missing, unreadable or holds no usable key."""


def generate_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Writes ``directory/name.key`` (public) and ``directory/name.key_secret`` (mode 0600).

    Refuses to overwrite an existing pair. Returns ``(public_path, secret_path)``.
    """
    directory = Path(directory)
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(public_path, 0o644)
    return public_path, secret_path


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise CurveKeyError(f"cannot read Curve key file {path}: {error}") from None
    if public is None or len(public) != 40:
        raise CurveKeyError(f"{path} holds no Curve public key")
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key (40 bytes) of a ``.key`` or ``.key_secret`` file."""
    return _load(path)[0]


def load_secret_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file."""
    public, secret = _load(path)
    if secret is None or len(secret) != 40:
        raise CurveKeyError(f"{path} holds no Curve secret key (pass the .key_secret file)")
    return public, secret


def load_authorized_keys(path: str | os.PathLike) -> frozenset[bytes]:
    """The Z85 public keys allowed to connect: one key file, or every ``*.key`` file in a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"*{PUBLIC_SUFFIX}"))
        if not files:
            raise CurveKeyError(f"no *{PUBLIC_SUFFIX} files in {path}: no producer could connect")
    else:
        files = [path]
    return frozenset(load_public_key(file) for file in files)


@dataclass(frozen=True)
class CurveServer:
    """The trainer's side: its own key pair and the producers' public keys it accepts (Z85)."""

    public_key: bytes
    secret_key: bytes
    authorized_keys: frozenset[bytes]

    @classmethod
    def from_files(cls, secret_key_path: str | os.PathLike, authorized_keys_path: str | os.PathLike) -> CurveServer:
        public, secret = load_secret_pair(secret_key_path)
        return cls(public, secret, load_authorized_keys(authorized_keys_path))


@dataclass(frozen=True)
class CurveClient:
    """A producer's side: its own key pair and the trainer's public key (Z85)."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes

    @classmethod
    def from_files(cls, secret_key_path: str | os.PathLike, server_key_path: str | os.PathLike) -> CurveClient:
        public, secret = load_secret_pair(secret_key_path)
        return cls(public, secret, load_public_key(server_key_path))


class CurveGuard:
    """The running ZAP handler of one server socket; counts the clients it let in and refused.

    :meth:`stop` must run before the socket's context is terminated (``Context.term`` waits
    for the handler's socket).
    """

    def __init__(self, context: zmq.Context, authorized_keys: frozenset[bytes]) -> None:
        self.authorized_keys = authorized_keys
        self.accepted = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._authenticator = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        self._authenticator.start()
        self._authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Called by the ZAP handler for every Curve handshake; ``client_key`` is Z85."""
        allowed = client_key in self.authorized_keys
        with self._lock:
            if allowed:
                self.accepted += 1
            else:
                self.refused += 1
                refused = self.refused
        if not allowed and refused & (refused - 1) == 0:  # the 1st, 2nd, 4th, 8th...
            log.warning("refused a Curve client with unlisted public key %s (#%d)", client_key.decode("ascii", "replace"), refused)
        return allowed

    def stop(self) -> None:
        """Stops the handler thread. Idempotent."""
        self._authenticator.stop()


def configure_server(socket: zmq.Socket, server: CurveServer) -> CurveGuard:
    """Makes ``socket`` a Curve server that accepts only ``server.authorized_keys``.

    Call before ``bind``/``connect``. Returns the running :class:`CurveGuard`; stop it before
    terminating the socket's context.
    """
    guard = CurveGuard(socket.context, server.authorized_keys)
    socket.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    socket.curve_secretkey = server.secret_key
    socket.curve_publickey = server.public_key
    socket.curve_server = True
    return guard


def configure_client(socket: zmq.Socket, client: CurveClient) -> None:
    """Makes ``socket`` a Curve client of the server whose public key is ``client.server_key``.
    Call before ``bind``/``connect``."""
    socket.curve_secretkey = client.secret_key
    socket.curve_publickey = client.public_key
    socket.curve_serverkey = client.server_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.curve", description="CurveZMQ keys for the Linepack link.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keygen = commands.add_parser("keygen", help="write NAME.key (public) and NAME.key_secret (0600) for each NAME",
                                 description="Generate Curve key pairs as ZeroMQ certificate files.")
    keygen.add_argument("directory", metavar="DIR", help="where the key files go (created with mode 0700 if missing)")
    keygen.add_argument("names", metavar="NAME", nargs="+", help="one key pair per name, e.g. trainer producer-1")
    args = parser.parse_args(argv)
    if not zmq.has("curve"):
        parser.error("this libzmq was built without Curve support")
    for name in args.names:
        if not name or os.sep in name or name.startswith("."):
            parser.error(f"{name!r} is not a plain file name")
        try:
            public_path, secret_path = generate_keypair(args.directory, name)
        except FileExistsError as error:
            parser.error(str(error))
        print(f"{name}: public {public_path}  secret {secret_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
