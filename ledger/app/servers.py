"""Start and stop real local Redis and PostgreSQL servers.

Used by the test harness (``tests/conftest.py``) and by ``ledger serve``, which starts private
servers under ``./.ledger/`` when no Redis or PostgreSQL URL is configured.

Everything here is synchronous and uses only the server binaries (``redis-server``,
``redis-cli``, ``initdb``, ``pg_ctl``) plus plain sockets, so it can run before any event loop
exists. Binaries come from ``PATH`` or, for PostgreSQL, ``/usr/lib/postgresql/<version>/bin``
(newest version first); ``make install`` installs the Debian packages that provide them.

PostgreSQL refuses to run as root. When this process is root, the PostgreSQL work directory is
chowned to the ``postgres`` OS user, the directories above it are given the traverse bit
(``o+x``) when they lack it, and ``initdb``/``pg_ctl`` run through ``runuser -u postgres --``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ledger.config import DEFAULT_DURABILITY, Durability, private_url_file, read_private_url
from ledger.defaults import CONNECT_TIMEOUT_S
from ledger.errors import OperationFailed

__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "ensure_private_postgres",
    "ensure_private_redis",
    "find_binary",
    "free_port",
    "start_postgres",
    "start_redis",
    "url_answers",
]

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class ServerError(OperationFailed):
    """A local server could not be found, started or stopped; the message says what to do.

    The first line is the whole reason; a server log tail may follow on the next lines.
    """


# --------------------------------------------------------------------------- helpers


def find_binary(name: str) -> str:
    """Return the absolute path of executable ``name``.

    Looks on ``PATH`` first, then in ``/usr/lib/postgresql/*/bin`` (newest major version first).
    Raises :class:`ServerError` naming the binary when it is nowhere to be found.
    """
    found = shutil.which(name)
    if found:
        return found
    for bindir in _pg_bindirs():
        candidate = Path(bindir) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServerError(
        f"{name!r} not found on PATH or under {PG_BIN_GLOB}: run `make install` "
        "(it installs the redis-server and postgresql Debian packages)"
    )


def _pg_bindirs() -> list[str]:
    """PostgreSQL binary directories, newest major version first."""

    def version(path: str) -> tuple[int, ...]:
        digits = re.findall(r"\d+", Path(path).parent.name)
        return tuple(int(d) for d in digits)

    return sorted(glob.glob(PG_BIN_GLOB), key=version, reverse=True)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """True when nothing listens on ``127.0.0.1:port`` and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _failed(reason: str, log_path: Path, output: str = "") -> ServerError:
    """A :class:`ServerError` whose first line is the reason and the log to read; the
    command's output and the log's tail follow on the next lines."""
    details = [part for part in (output.strip()[-2000:], _log_tail(log_path)) if part]
    return ServerError("\n".join([f"{reason}: read {log_path}", *details]))


def _log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(empty log at {path})"


def _pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # "pid (comm) state ..." -- comm may contain spaces/parens; the state follows the last ')'.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited; True if it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def _is_redis_process(pid: int) -> bool:
    """True when ``pid`` runs redis-server (guards against a recycled pid in a pid file)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid file
    return b"redis-server" in cmdline


def _children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc scan; empty elsewhere)."""
    children = []
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            stat = Path(stat_path).read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(Path(stat_path).parent.name))
    return children


def _signal(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _redis_command(port: int, *args: str, timeout: float = 2.0) -> str:
    """Send one command to a Redis server over RESP and return the reply as text.

    Handles simple strings, errors (raised as ``ServerError``), integers and bulk strings,
    which is all the harness needs (PING, CLUSTER INFO, INFO).
    """
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(payload.encode())
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n")
        kind, body = head[:1], head[1:].decode()
        if kind in (b"+", b":"):
            return body
        if kind == b"-":
            raise ServerError(f"redis error: {body}")
        if kind == b"$":
            size = int(body)
            if size < 0:
                return ""
            while len(rest) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed")
                rest += chunk
            return rest[:size].decode(errors="replace")
        raise ServerError(f"unexpected redis reply {head!r}")


def _redis_pings(port: int) -> bool:
    """True when a Redis server on ``port`` answers PING with PONG (not LOADING)."""
    try:
        return _redis_command(port, "PING", timeout=1.0) == "PONG"
    except (OSError, ServerError):
        return False


def url_answers(url: str, timeout: float = 2.0) -> bool:
    """True when the server at a ``redis://`` or ``postgresql://`` URL answers right now."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        if parts.scheme == "rediss" or parts.password:
            return _tcp_open(parts.hostname or HOST, parts.port or 6379, timeout)
        host, port = parts.hostname or HOST, parts.port or 6379
        if host not in ("127.0.0.1", "localhost"):
            return _tcp_open(host, port, timeout)
        return _redis_pings(port)
    if parts.scheme in ("postgresql", "postgres"):
        try:
            import psycopg

            with psycopg.connect(url, connect_timeout=max(1, int(timeout))) as conn:
                conn.execute("SELECT 1")
            return True
        except Exception:
            return False
    raise ValueError(f"unsupported URL scheme in {url!r}")


def _tcp_open(host: str, port: int, timeout: float) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    """A ``redis-server`` process on ``127.0.0.1:port`` with its files in ``workdir``.

    ``start()`` spawns it in the foreground mode (``--daemonize no``) as a child process, or in
    its own session when ``detached`` (it then outlives the caller). Logs go to
    ``workdir/redis.log``; the pid is written to ``workdir/redis.pid``.
    """

    workdir: Path
    port: int
    appendonly: bool = True
    detached: bool = False
    extra_args: Sequence[str] = ()
    durability: Durability = DEFAULT_DURABILITY
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def pid_path(self) -> Path:
        return self.workdir / "redis.pid"

    @property
    def pid(self) -> int | None:
        """Pid of the running server, or None when it is not running."""
        if self.process is not None:
            return self.process.pid if self.process.poll() is None else None
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) and _is_redis_process(pid) else None

    def is_running(self) -> bool:
        """True when the server answers PING."""
        return _redis_pings(self.port)

    def command_line(self) -> list[str]:
        """The ``redis-server`` argv used by :meth:`start`."""
        return [
            find_binary("redis-server"),
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.workdir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.durability.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Spawn the server and wait until it answers PING (AOF loaded). Returns self.

        Raises :class:`ServerError` with the log tail if it exits or does not answer in time.
        """
        if self.pid is not None and self.is_running():
            return self
        if not _port_is_free(self.port):
            raise ServerError(f"cannot start redis-server: port {self.port} on {HOST} is already in use")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = self.command_line()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detached,
                close_fds=True,
            )
        self.pid_path.write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _failed(
                    f"redis-server exited with status {self.process.returncode} while starting on port {self.port}",
                    self.log_path,
                )
            if _redis_pings(self.port):
                return self
            time.sleep(0.05)
        self.kill()
        raise _failed(f"redis-server on port {self.port} did not answer PING within {timeout:.0f}s", self.log_path)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully (SIGTERM: the AOF is flushed) and wait; SIGKILL after ``timeout``."""
        pid = self.pid
        if pid is None:
            self._reap()
            return
        _signal(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            _signal(pid, signal.SIGKILL)
            self._wait_exit(pid, timeout)
        self._reap()

    def kill(self) -> None:
        """Kill with SIGKILL (a crash, for fault tests) and wait until the process is gone."""
        pid = self.pid
        if pid is not None:
            _signal(pid, signal.SIGKILL)
            self._wait_exit(pid, STOP_TIMEOUT)
        self._reap()

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Stop if still running, then start again on the same port and directory."""
        if self.pid is not None:
            self.stop()
        deadline = time.monotonic() + timeout
        while not _port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.start(timeout=timeout)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self.process is not None and self.process.pid == pid:
            try:
                self.process.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        return _wait_pid_gone(pid, timeout)

    def _reap(self) -> None:
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.1)
            self.process = None
        with contextlib.suppress(OSError):
            self.pid_path.unlink()


def start_redis(
    workdir: Path,
    port: int | None = None,
    appendonly: bool = True,
    *,
    detached: bool = False,
    extra_args: Sequence[str] = (),
    durability: Durability = DEFAULT_DURABILITY,
) -> RedisServer:
    """Start a ``redis-server`` on ``127.0.0.1`` (a free port unless given) with files in
    ``workdir``, wait until it answers, and return it."""
    server = RedisServer(
        workdir=Path(workdir),
        port=port if port is not None else free_port(),
        appendonly=appendonly,
        detached=detached,
        extra_args=tuple(extra_args),
        durability=durability,
    )
    return server.start()


@dataclass
class PostgresServer:
    """A PostgreSQL server on ``127.0.0.1:port``, cluster files in ``workdir/data``.

    Unix sockets go to ``workdir/run`` (or a short temp dir when that path is too long for a
    socket), the server log to ``workdir/postgres.log``. Authentication is ``trust`` for the
    superuser ``postgres``.
    """

    workdir: Path
    port: int
    socketdir: Path | None = None
    durability: Durability = DEFAULT_DURABILITY

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid`` when it is alive, else None."""
        info = _postmaster_info(self.datadir)
        if info is None:
            return None
        pid = info[0]
        return pid if _pid_alive(pid) else None

    def is_running(self) -> bool:
        """True when the postmaster is alive and accepts TCP connections on the port."""
        return self.pid is not None and _tcp_open(HOST, self.port, 1.0)

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def init(self) -> None:
        """Run ``initdb`` unless the data directory is initialized already."""
        self._prepare_dirs()
        if self.initialized():
            return
        if self.datadir.exists():
            # A half-finished initdb (no PG_VERSION) leaves a directory initdb refuses to reuse.
            shutil.rmtree(self.datadir)
        self._prepare_dirs()
        initdb = find_binary("initdb")
        self._run(
            [
                initdb,
                "-D", str(self.datadir),
                "-U", "postgres",
                "--auth=trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            what="initdb",
        )  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> PostgresServer:
        """Start the server (``pg_ctl start -w``) on the same port; initdb first if needed.

        A no-op when it is already running. Raises :class:`ServerError` with the log tail.
        """
        if self.is_running():
            return self
        self.init()
        if not _port_is_free(self.port):
            raise ServerError(f"cannot start PostgreSQL: port {self.port} on {HOST} is already in use")
        options = f"-p {self.port} -k {self._socketdir()} -c listen_addresses={HOST} -c fsync={self.durability.fsync}"
        pg_ctl = _pg_tool("pg_ctl")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._run(
                    [
                        pg_ctl, "-D", str(self.datadir), "-l", str(self.log_path),
                        "-o", options, "-w", "-t", str(int(max(5, timeout))), "start",
                    ],
                    what="pg_ctl start",
                    timeout=timeout + 10,
                )  # fmt: skip
                break
            except ServerError:
                # After a kill, old backends may hold the shared memory for a moment.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        if not _wait_tcp(HOST, self.port, timeout):
            raise _failed(f"PostgreSQL started but does not accept connections on port {self.port}", self.log_path)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop with ``pg_ctl stop -m fast`` and wait; a no-op when not running."""
        pid = self.pid
        if pid is None:
            return
        try:
            self._run(
                [_pg_tool("pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w",
                 "-t", str(int(timeout)), "stop"],
                what="pg_ctl stop",
                timeout=timeout + 10,
            )  # fmt: skip
        except ServerError:
            if self.pid is not None:
                self.kill()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster (pid from ``postmaster.pid``) and then its
        backends, as a machine crash would; wait until they are gone."""
        pid = self.pid
        if pid is None:
            return
        children = _children_of(pid)
        _signal(pid, signal.SIGKILL)
        for child in children:
            _signal(child, signal.SIGKILL)
        _wait_pid_gone(pid, STOP_TIMEOUT)
        for child in children:
            _wait_pid_gone(child, STOP_TIMEOUT)

    def restart(self, timeout: float = START_TIMEOUT) -> PostgresServer:
        """Stop if running, then start again on the same port and data directory."""
        self.stop()
        return self.start(timeout=timeout)

    # -- internals

    def _socketdir(self) -> Path:
        if self.socketdir is None:
            candidate = self.workdir / "run"
            # sun_path is 108 bytes; the socket file name is ".s.PGSQL.<port>" (+ ".lock").
            if len(str(candidate.resolve())) + 22 > 100:
                import tempfile

                candidate = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
            self.socketdir = candidate
        self.socketdir.mkdir(parents=True, exist_ok=True)
        if _is_root():
            _chown_postgres(self.socketdir)
        return self.socketdir

    def _prepare_dirs(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if _is_root():
            _make_traversable(self.workdir)
            _chown_postgres(self.workdir, recursive=True)
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        if _is_root():
            _chown_postgres(self.datadir)

    def _run(self, argv: list[str], what: str, timeout: float = 120.0) -> None:
        if _is_root():
            runuser = shutil.which("runuser")
            if runuser is None:
                raise ServerError(
                    "PostgreSQL cannot run as root and `runuser` is missing: "
                    "install util-linux or run as a non-root user"
                )
            argv = [runuser, "-u", "postgres", "--", *argv]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                cwd=str(self.workdir),
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise _failed(f"{what} timed out after {timeout:.0f}s", self.log_path) from exc
        if result.returncode != 0:
            raise _failed(f"{what} failed (status {result.returncode})", self.log_path, result.stdout + result.stderr)


def _pg_tool(name: str) -> str:
    """``name`` from the same directory as ``initdb`` (one PostgreSQL version), else anywhere."""
    initdb_dir = Path(os.path.realpath(find_binary("initdb"))).parent
    candidate = initdb_dir / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return find_binary(name)


def _postmaster_info(datadir: Path) -> tuple[int, int] | None:
    """(pid, port) from ``datadir/postmaster.pid``, or None when absent/unreadable."""
    try:
        lines = (datadir / "postmaster.pid").read_text().splitlines()
        return int(lines[0].strip()), int(lines[3].strip())
    except (OSError, ValueError, IndexError):
        return None


def _wait_tcp(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _tcp_open(host, port, 1.0):
            return True
        time.sleep(0.05)
    return False


def _postgres_ids() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServerError(
            "running as root but there is no `postgres` OS user to run PostgreSQL as: "
            "run `make install` (the postgresql package creates it)"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def _chown_postgres(path: Path, recursive: bool = False) -> None:
    uid, gid = _postgres_ids()
    os.chown(path, uid, gid)
    if recursive:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _make_traversable(path: Path) -> None:
    """Give every directory above ``path`` the o+x (traverse) bit if it lacks it, so that the
    ``postgres`` user can reach its files (no read permission is added)."""
    for parent in Path(path).resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


def start_postgres(
    workdir: Path, port: int | None = None, *, durability: Durability = DEFAULT_DURABILITY
) -> PostgresServer:
    """Start PostgreSQL with its cluster in ``workdir/data`` on ``127.0.0.1`` (a free port
    unless given): ``initdb`` only if not initialized yet, then ``pg_ctl start -w``."""
    server = PostgresServer(
        workdir=Path(workdir), port=port if port is not None else free_port(), durability=durability
    )
    return server.start()


# --------------------------------------------------------------------------- private servers


def _write_private_url(base: Path, kind: str, url: str) -> None:
    path = private_url_file(base, kind)
    tmp = path.with_suffix(".url.tmp")
    tmp.write_text(url + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(base: Path, kind: str) -> Iterator[None]:
    """Serialize concurrent ``ensure_private_*`` calls on the same base directory."""
    Path(base).mkdir(parents=True, exist_ok=True)
    with open(Path(base) / f"{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _recorded_port(url: str | None) -> int | None:
    if not url:
        return None
    try:
        return urlsplit(url).port
    except ValueError:
        return None


def ensure_private_redis(base: Path, durability: Durability = DEFAULT_DURABILITY) -> str:
    """Return the URL of the private Redis under ``base/redis``, starting it if needed.

    Reuses the server recorded in ``base/redis.url`` when it answers (its ``appendfsync`` set
    to what ``durability`` asks); otherwise starts one (the recorded port if it is free, else a
    free port) as a daemon in its own session, so it keeps running after the caller exits, and
    records its URL.
    """
    base = Path(base).absolute()
    with _locked(base, "redis"):
        url = read_private_url(base, "redis")
        port = _recorded_port(url)
        if url and port is not None and url_answers(url):
            _redis_command(port, "CONFIG", "SET", "appendfsync", durability.appendfsync)
            return url
        workdir = base / "redis"
        stale = RedisServer(workdir=workdir, port=port or 0)
        if stale.pid is not None:
            raise ServerError(
                f"a redis-server (pid {stale.pid}) runs from {workdir} but does not answer at "
                f"{url or '(no recorded URL)'}: stop it (kill {stale.pid}) and retry"
            )
        if port is None or not _port_is_free(port):
            port = free_port()
        server = start_redis(workdir, port, appendonly=True, detached=True, durability=durability)
        _write_private_url(base, "redis", server.url)
        return server.url


def ensure_private_postgres(base: Path, durability: Durability = DEFAULT_DURABILITY) -> str:
    """Return the URL of the private PostgreSQL under ``base/postgres``, starting it if needed.

    Reuses the server recorded in ``base/postgres.url`` (or the one ``postmaster.pid`` says is
    running from that directory) when it answers, restarted when it runs with another ``fsync``
    than ``durability`` asks; otherwise starts it (the recorded port if it is free, else a free
    port) and records its URL. PostgreSQL always runs detached.
    """
    base = Path(base).absolute()
    with _locked(base, "postgres"):
        url = read_private_url(base, "postgres")
        workdir = base / "postgres"
        port = _recorded_port(url)
        if url and port is not None and url_answers(url):
            return _keep_durability(PostgresServer(workdir=workdir, port=port, durability=durability)).url
        running = PostgresServer(workdir=workdir, port=0, durability=durability)
        info = _postmaster_info(running.datadir)
        if info is not None and running.pid is not None:
            running.port = info[1]
            if _wait_tcp(HOST, running.port, 10.0) and url_answers(running.url):
                _write_private_url(base, "postgres", _keep_durability(running).url)
                return running.url
            raise ServerError(
                f"a PostgreSQL server (pid {info[0]}) runs from {running.datadir} but does not "
                f"answer on port {running.port}: stop it (pg_ctl -D {running.datadir} stop) "
                "and retry"
            )
        if port is None or not _port_is_free(port):
            port = free_port()
        server = start_postgres(workdir, port, durability=durability)
        _write_private_url(base, "postgres", server.url)
        return server.url


def _keep_durability(server: PostgresServer) -> PostgresServer:
    """Restart the running ``server`` when its ``fsync`` is not the one its durability asks
    for (a server started by an older ledger, or with another ``LEDGER_DURABILITY``)."""
    import psycopg

    with psycopg.connect(server.url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
        row = conn.execute("SHOW fsync").fetchone()
    if row is None or row[0] != server.durability.fsync:
        server.restart()
    return server
