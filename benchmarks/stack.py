"""The servers of one benchmark: its own Redis and PostgreSQL and ``ledger serve`` as a subprocess.

Redis and PostgreSQL are started with ``ledger.app.servers`` (the same private servers the tests
use), with the durability the ledger defaults to (``ledger.config.DEFAULT_DURABILITY``: Redis
``appendfsync always`` with AOF on, PostgreSQL ``fsync=on``, ``synchronous_commit`` left at its
default ``on``). ``ledger serve`` runs black-box, every role, as a strategy would see it:
``okx`` executed externally (the benchmark reports the fills itself), ``binance`` by the paper
venue (for ``open_position`` and the paper lifecycle).
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis as redis_sync

from ledger.app.servers import PostgresServer, RedisServer, start_postgres, start_redis
from ledger.config import Durability

LEDGER_BIN = Path(sys.executable).parent / "ledger"
EXECUTION = "okx=external,binance=paper"
SERVE_STOP_TIMEOUT_S = 30.0


class BenchError(RuntimeError):
    """A benchmark could not run (a server or ``serve`` failed); the message says where to look."""


@dataclass
class Stack:
    """One benchmark's Redis, PostgreSQL and (once started) ``ledger serve``."""

    name: str
    workdir: Path
    redis: RedisServer
    postgres: PostgresServer
    serve: subprocess.Popen[bytes] | None = None
    serve_extra: dict[str, str] = field(default_factory=dict)
    peak_rss_bytes: int = 0

    @property
    def serve_log(self) -> Path:
        return self.workdir / "serve.log"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a ``ledger`` subprocess on this stack's servers."""
        # LEDGER_PROCESSES is kept, so that serve's modes can be compared (LEDGER_PROCESSES=1).
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_") or k == "LEDGER_PROCESSES"}
        env.update(
            LEDGER_REDIS_URL=self.redis.url,
            LEDGER_DATABASE_URL=self.postgres.url,
            LEDGER_EXECUTION=EXECUTION,
            LEDGER_HOME=str(self.workdir / "home"),
            LEDGER_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def start_serve(self, **extra: str) -> None:
        """``ledger serve`` (all roles) with ``extra`` settings (``LEDGER_RETENTION_MS=...``)."""
        if self.serve is not None:
            raise BenchError(f"{self.name}: serve is already running (pid {self.serve.pid})")
        self.serve_extra = dict(extra)
        with open(self.serve_log, "ab") as log:
            self.serve = subprocess.Popen(
                [str(LEDGER_BIN), "serve"],
                cwd=self.workdir,
                env=self.env(**extra),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def check_serve(self) -> None:
        """Raise when ``serve`` has exited (with the tail of its log)."""
        if self.serve is not None and self.serve.poll() is not None:
            tail = "\n".join(self.serve_log.read_text(errors="replace").splitlines()[-15:])
            raise BenchError(f"{self.name}: ledger serve exited with status {self.serve.returncode}:\n{tail}")

    def serve_pid(self) -> int:
        """The pid of the running ``serve`` (its supervisor)."""
        if self.serve is None:
            raise BenchError(f"{self.name}: serve is not running")
        return self.serve.pid

    def serve_rss(self) -> int:
        """The peak resident set size of ``serve``'s whole process tree so far, in bytes: the sum
        of the peaks (VmHWM) of the supervisor and its role processes (``LEDGER_PROCESSES=roles``),
        an upper bound of the tree's peak, since they need not peak at the same moment (a sampled
        sum of VmRSS could miss a short peak between samples); 0 when not running."""
        if self.serve is None or self.serve.poll() is not None:
            return self.peak_rss_bytes
        total = sum(_peak_rss(pid) for pid in _process_tree(self.serve.pid))
        self.peak_rss_bytes = max(self.peak_rss_bytes, total)
        return self.peak_rss_bytes

    def stop_serve(self) -> None:
        """SIGTERM ``serve`` (it finishes its batch) and wait; SIGKILL if it does not exit."""
        if self.serve is None:
            return
        self.serve_rss()
        if self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(timeout=SERVE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait(timeout=SERVE_STOP_TIMEOUT_S)
        self.serve = None

    def ledger(self, *args: str, timeout: float = 3600.0) -> tuple[float, subprocess.CompletedProcess[bytes]]:
        """Run ``ledger ARGS`` on this stack; (seconds it took, the finished process)."""
        started = time.perf_counter()
        done = subprocess.run(
            [str(LEDGER_BIN), *args],
            cwd=self.workdir,
            env=self.env(**self.serve_extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
        return time.perf_counter() - started, done

    def close(self) -> None:
        """Stop everything; ``serve`` with SIGKILL (its servers are thrown away: no need to wait
        the second its consumers block for)."""
        if self.serve is not None:
            self.serve_rss()
            self.serve.kill()
            self.serve.wait(timeout=SERVE_STOP_TIMEOUT_S)
            self.serve = None
        self.redis.stop()
        self.postgres.stop()


def _process_tree(root: int) -> list[int]:
    """``root`` and every process under it (from each process's parent in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(root: int) -> float:
    """The CPU (user + system) that ``root`` and every process under it have spent so far, in
    seconds (``/proc/<pid>/stat``): each living process's own, and what its children that ended
    and were waited for spent (a PostgreSQL backend that closed, say)."""
    ticks = 0
    for pid in _process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime (stat's 14-17)
    return ticks / os.sysconf("SC_CLK_TCK")


def _peak_rss(pid: int) -> int:
    """A process's peak resident set size (VmHWM) in bytes; 0 when it is gone."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def postgres_template(root: Path) -> Path:
    """An initialized PostgreSQL data directory (``initdb`` once per run), copied by each stack."""
    template = PostgresServer(workdir=root / "pg-template", port=0)
    template.init()
    return template.datadir


def open_stack(root: Path, name: str, durability: Durability, template: Path) -> Stack:
    """Start a fresh Redis and PostgreSQL (a copy of ``template``) for benchmark ``name``."""
    workdir = root / name
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "postgres").mkdir(parents=True)
    shutil.copytree(template, workdir / "postgres" / "data", symlinks=True)
    redis = start_redis(workdir / "redis", appendonly=True, durability=durability)
    try:
        postgres = start_postgres(workdir / "postgres", durability=durability)
    except BaseException:
        redis.stop()
        raise
    return Stack(name=name, workdir=workdir, redis=redis, postgres=postgres)


def durability_in_force(stack: Stack, durability: Durability) -> dict[str, Any]:
    """The durability settings the servers report (not what was asked: what they run with)."""
    client = redis_sync.Redis.from_url(stack.redis.url, decode_responses=True, socket_timeout=10)
    try:
        redis_config = {name: client.config_get(name)[name] for name in ("appendonly", "appendfsync")}
    finally:
        client.close()
    with psycopg.connect(stack.postgres.url, autocommit=True, connect_timeout=10) as conn:
        pg = {name: _show(conn, name) for name in ("fsync", "synchronous_commit", "wal_sync_method")}
    return {"level": str(durability), "redis": redis_config, "postgresql": pg}


def machine(stack: Stack) -> dict[str, Any]:
    """CPU model, cores, RAM, kernel, Python, Redis and PostgreSQL versions."""
    cpu = "unknown"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            ram = int(line.split()[1]) * 1024
    client = redis_sync.Redis.from_url(stack.redis.url, decode_responses=True, socket_timeout=10)
    try:
        redis_version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    with psycopg.connect(stack.postgres.url, autocommit=True, connect_timeout=10) as conn:
        pg_version = _show(conn, "server_version")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis": redis_version,
        "postgresql": pg_version,
        "load_average_at_start": list(os.getloadavg()),
    }


def _show(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute(f"SHOW {name}").fetchone()
    return "" if row is None else str(row[0])


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
