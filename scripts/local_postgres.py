"""A throwaway PostgreSQL server on this machine, for the tests and bench/serve.py.

The server binaries come from the ``pgserver`` wheel (the ``test`` extra: PostgreSQL 16 built for
manylinux), so nothing is installed by hand and nothing needs root. PostgreSQL refuses to run as
root; under root the server runs as the system user ``mbc-postgres`` (made here if missing).

    python scripts/local_postgres.py DATA_DIR     # start, print the URL, stop on Ctrl-C

    with LocalPostgres(tmp_dir) as server:        # from Python
        server.url                                # postgresql://postgres:mbc@127.0.0.1:PORT/postgres
        server.kill(); server.start()             # SIGKILL and restart on the same data
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SERVER_USER = "mbc-postgres"


def binaries() -> Path:
    """The folder of ``postgres`` and ``initdb``: the pgserver wheel's, else those on PATH."""
    spec = importlib.util.find_spec("pgserver")  # found, not imported: importing it starts its own machinery
    if spec is not None and spec.submodule_search_locations:
        return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    found = shutil.which("postgres")
    if found is None:
        raise RuntimeError("no PostgreSQL server binaries: pip install pgserver (the test extra)")
    return Path(found).resolve().parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _open_path_to(path: Path) -> None:
    """Let the server's user reach ``path``: every folder above it gains o+x (a temporary folder is 0700)."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o001)


def _server_user() -> str | None:
    """The user the server runs as: None (this one) unless this is root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_USER], check=True)
    return SERVER_USER


class LocalPostgres:
    """A PostgreSQL server on 127.0.0.1 with its data in ``folder / 'data'``; its user ``postgres``
    signs in with ``password``."""

    def __init__(self, folder: str | Path, port: int | None = None, password: str = "mbc"):
        self.folder, self.password = Path(folder).resolve(), password
        self.data = self.folder / "data"
        self.port = port or _free_port()
        self.user = _server_user()
        self.process: subprocess.Popen | None = None
        self.bin = binaries()

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run_as_server_user(self, command: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(command, user=self.user, group=self.user, **kwargs)

    def _initdb(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user:
            _open_path_to(self.bin)
            _open_path_to(self.folder)
            shutil.chown(self.folder, self.user, self.user)
        password_file = self.folder / "password"
        password_file.write_text(self.password)
        if self.user:
            shutil.chown(password_file, self.user, self.user)
        init = self._run_as_server_user(
            [
                *(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8"),
                *("--auth=scram-sha-256", f"--pwfile={password_file}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, error = init.communicate(timeout=120)
        if init.returncode:
            raise RuntimeError(f"initdb failed: {error.decode(errors='replace')[-2000:]}")

    def start(self, timeout: float = 60) -> "LocalPostgres":
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        log = (self.folder / "server.log").open("ab")
        self.process = self._run_as_server_user(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1", "-k", ""],
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C in a terminal reaches the caller, who stops it in order
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited at start: {(self.folder / 'server.log').read_text()[-2000:]}")
            if self._accepts():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections within {timeout} s")

    def _accepts(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (its children follow): a crash, as a power cut would leave the data."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            time.sleep(0.2)  # the backends notice the postmaster's death and exit

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/local_postgres.py DATA_DIR")
    with LocalPostgres(sys.argv[1]) as server:
        print(server.url, flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
