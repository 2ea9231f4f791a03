"""The consumer's ZeroMQ ROUTER socket: its options, its CurveZMQ guard, and its lifecycle.

The socket binds by default (producers connect their DEALER sockets). It carries both ways:
producers' meta and batch messages in, the trainer's orders out, each addressed by the
producer's routing id (docs/PROTOCOL.md §1). Its receive high-water mark per producer is small
(orders bound what a genuine producer sends; this bounds a hostile one), ``MAXMSGSIZE`` makes
ZeroMQ drop a peer that sends an oversized frame before buffering it, and an order to a producer
whose queue is full (a DEALER that never reads) is dropped by ZeroMQ, never buffered.
"""

from __future__ import annotations

import zmq

from shared.curve import CurveGuard, CurveServer, configure_server

RECEIVE_HWM = 16  # messages buffered per connected producer before it blocks (orders keep genuine ones below)
SEND_HWM = 64  # orders queued per producer; beyond, ZeroMQ drops them (a peer that never reads)
# A peer that has not finished the ZMTP (and Curve) handshake this soon is dropped, so connections
# that never handshake cannot pile up and use the trainer's file descriptors (ZeroMQ's default is 30 s).
HANDSHAKE_MS = 2000
# The largest tensor frame of a real stream is rows_per_message x block_size x 2 bytes (2 MiB at
# 1024 x 1024); 64 MiB leaves room for any sensible configuration.
MAX_FRAME_BYTES = 64 << 20


class Receiver:
    """A ROUTER socket on ``endpoint``; :attr:`endpoint` holds the real address after :meth:`open`.

    Args:
        bind: bind (producers connect) or connect (producers bind).
        max_frame_bytes: a peer that sends a larger frame is disconnected by ZeroMQ unread.
        curve: when set, the socket is a CurveZMQ server that accepts only the listed producers.
    """

    def __init__(self, endpoint: str, bind: bool = True, max_frame_bytes: int = MAX_FRAME_BYTES,
                 curve: CurveServer | None = None) -> None:
        self.endpoint = endpoint
        self.bind = bind
        self.max_frame_bytes = max_frame_bytes
        self.curve = curve
        self.curve_guard: CurveGuard | None = None  # counts accepted / refused Curve clients
        self._context: zmq.Context | None = None
        self.socket: zmq.Socket | None = None

    def open(self) -> None:
        """Creates, configures and binds (or connects) the socket; closes everything on failure."""
        self._context = zmq.Context()
        self.socket = self._context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        try:
            if self.curve is not None:
                self.curve_guard = configure_server(self.socket, self.curve)
            if self.bind:
                self.socket.bind(self.endpoint)
                self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self.socket.connect(self.endpoint)
        except zmq.ZMQError:
            self.close()
            raise

    def poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        return poller
    def receive(self) -> tuple[bytes, list[zmq.Frame]]:
        """The sender's routing id and the frames of the next message (call after the poller says
        one is there)."""
        routing_id, *frames = self.socket.recv_multipart(copy=False)
        return routing_id.bytes, frames

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        """Sends to one producer without blocking; ZeroMQ drops it if that producer's queue is full."""
        try:
            self.socket.send_multipart([peer, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        """Closes the socket, stops the Curve guard, terminates the context. Idempotent."""
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        if self.curve_guard is not None:
            self.curve_guard.stop()
        if self._context is not None:
            self._context.term()
            self._context = None
