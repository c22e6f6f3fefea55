"""A private redis-server for the local profile and for tests (never a shared one)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class LocalRedis:
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    def is_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, *, appendonly: bool = True) -> None:
        # redis-server changes into --dir before opening the pid and log files.
        directory = self.directory.resolve()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `apt-get install -y redis-server`")
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--daemonize",
                "yes",
                "--save",
                "",
                "--appendonly",
                "yes" if appendonly else "no",
                "--appendfsync",
                "everysec",
                "--dir",
                str(directory),
                "--pidfile",
                str(directory / "redis.pid"),
                "--logfile",
                str(directory / "redis.log"),
            ],
            check=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.is_up():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not answer on port {self.port}; see {self.directory}/redis.log"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if not self.is_up():
            return
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"SHUTDOWN NOSAVE\r\n")
                sock.recv(64)
        except OSError:
            pass
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.is_up() and time.monotonic() < deadline:
            time.sleep(0.05)
