"""A small memcached-protocol proxy, run as its own process, in front of a real memcached.

No memcached without meta commands (before 1.6) is packaged here, and
memcached has no switch that turns them off; the proxies that refuse them
(twemproxy and others) are not packaged either.  This proxy is the peer the
lease fallback is tested against: it forwards the classic text protocol to a
real memcached and answers every meta command (``mg``, ``ms``, ``md``,
``mn``, ``ma``, ``me``) with ``ERROR``, as a server that does not know the
command does -- a meta set's data block then reaches it as a line of its own
and gets an ``ERROR`` too, again as on such a server.

With ``--meta pass`` it forwards meta commands as well, and ``--stall
SECONDS`` makes it hold back the second half of every response to a request
whose key contains ``stall``: a client with a shorter timeout then times out
in the middle of a response (the connection-hygiene test).

Requests on a connection are handled one at a time (forwarded, answered,
relayed), one thread per client connection.  Run::

    python tests/support/memcached_proxy.py LISTEN_PORT UPSTREAM_PORT [--meta refuse|pass] [--stall S]

:class:`ProxyProcess` starts it on a free port and stops it by PID.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["ProxyProcess"]

META = {b"mg", b"ms", b"md", b"mn", b"ma", b"me"}
STORAGE = {b"set", b"add", b"replace", b"append", b"prepend", b"cas"}
RETRIEVAL = {b"get", b"gets", b"gat", b"gats"}


class Closed(Exception):
    """One side closed its connection."""


class Reader:
    """Buffered reads of lines and blocks from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Closed
        self.buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def block(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._more()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data


def read_response(upstream: Reader, command: bytes, tokens: list[bytes]) -> bytes:
    """The whole response of memcached to one request."""
    if command in RETRIEVAL or command == b"stats":
        out = b""
        while True:
            line = upstream.line()
            out += line
            if line.startswith(b"VALUE "):
                out += upstream.block(int(line.split()[3]) + 2)
            elif line in (b"END\r\n",) or line.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")):
                return out
    line = upstream.line()
    if command == b"mg" and line.startswith(b"VA "):
        return line + upstream.block(int(line.split()[1]) + 2)
    return line


def serve(client: socket.socket, upstream_port: int, refuse_meta: bool, stall: float) -> None:
    upstream_sock = socket.create_connection(("127.0.0.1", upstream_port))
    upstream_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    requests, upstream = Reader(client), Reader(upstream_sock)
    try:
        while True:
            line = requests.line()
            tokens = line.split()
            if not tokens:
                client.sendall(b"ERROR\r\n")
                continue
            command = tokens[0]
            if command in META and refuse_meta:
                client.sendall(b"ERROR\r\n")
                continue
            request = line
            if command in STORAGE and len(tokens) >= 5:
                request += requests.block(int(tokens[4]) + 2)
            elif command == b"ms" and len(tokens) >= 3:
                request += requests.block(int(tokens[2]) + 2)
            upstream_sock.sendall(request)
            if tokens[-1] == b"noreply" or (command in META and b"q" in tokens[2:]):
                continue
            response = read_response(upstream, command, tokens)
            if stall and len(tokens) > 1 and b"stall" in tokens[1] and len(response) > 1:
                half = len(response) // 2
                client.sendall(response[:half])
                time.sleep(stall)
                client.sendall(response[half:])
            else:
                client.sendall(response)
    except (Closed, OSError):
        pass
    finally:
        client.close()
        upstream_sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("upstream", type=int)
    parser.add_argument("--meta", choices=["refuse", "pass"], default="refuse")
    parser.add_argument("--stall", type=float, default=0.0)
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", args.port), backlog=512)
    while True:
        client, _address = listener.accept()
        threading.Thread(
            target=serve, args=(client, args.upstream, args.meta == "refuse", args.stall), daemon=True
        ).start()


class ProxyProcess:
    """The proxy in a process of its own, on a free loopback port, stopped by PID.

    :param upstream: the real memcached's ``host:port``.
    :param meta: ``"refuse"`` (answer ``ERROR`` to meta commands) or ``"pass"``.
    :param stall: seconds the second half of responses to ``stall`` keys is held back.
    """

    def __init__(self, upstream: str, *, meta: str = "refuse", stall: float = 0.0) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        command = [sys.executable, str(Path(__file__).resolve()), str(self.port), upstream.rpartition(":")[2]]
        command += ["--meta", meta, "--stall", str(stall)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the memcached proxy did not start") from None
                time.sleep(0.02)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


if __name__ == "__main__":
    main()
