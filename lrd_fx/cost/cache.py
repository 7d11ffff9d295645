"""Persistent SQLite timing cache: a second compile of the same model on the same machine measures nothing."""
from __future__ import annotations

import os
import platform
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from ..errors import CacheError
from .timer import Measurement

FORMAT = "lrd_fx-timings/2"   # /2: min_s column
_BUSY_MS = 30_000    # concurrent compiles wait for each other's writes this long before failing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS timings (
    device TEXT NOT NULL,
    torch_version TEXT NOT NULL,
    dtype TEXT NOT NULL,
    memory_format TEXT NOT NULL,
    signature TEXT NOT NULL,
    input_shape TEXT NOT NULL,
    rank TEXT NOT NULL,
    objective TEXT NOT NULL,
    median_s REAL NOT NULL,
    iqr_s REAL NOT NULL,
    n INTEGER NOT NULL,
    min_s REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (device, torch_version, dtype, memory_format, signature, input_shape, rank, objective)
);
"""
_KEY = ("device", "torch_version", "dtype", "memory_format", "signature", "input_shape", "rank", "objective")


def default_path() -> Path:
    """$LRD_FX_CACHE, else $XDG_CACHE_HOME/lrd_fx/timings.sqlite, else ~/.cache/lrd_fx/timings.sqlite."""
    env = os.environ.get("LRD_FX_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lrd_fx" / "timings.sqlite"


def resolve(setting: Union[bool, str, os.PathLike, None]) -> Optional[Path]:
    """Config.cache -> a path, or None when caching is off (False/None)."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return default_path()
    return Path(setting).expanduser()


def device_name(device) -> str:
    """What the timings were measured on: the GPU name, or the CPU model and thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(idx)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{dev.type}:{cpu}:threads={torch.get_num_threads()}"


def _move_aside(path: Path, why: str) -> None:
    dest = path.with_name(f"{path.name}.corrupt-{int(time.time())}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        try:
            os.replace(str(path) + suffix, str(dest) + suffix)
        except FileNotFoundError:
            pass    # another process moved it already, or there was no journal
    warnings.warn(f"lrd_fx timing cache '{path}' is unusable ({why}); moved it to '{dest}' and starting "
                  f"a new one (timings will be measured again)", RuntimeWarning, stacklevel=3)


class TimingCache:
    """One SQLite file; every method is a short transaction, so several processes can share it."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._conn: Optional[sqlite3.Connection] = None

    # --- connection ------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the timing cache directory '{self.path.parent}': {e}; set "
                             f"LRD_FX_CACHE to a writable file, or pass cache=False") from e
        conn = sqlite3.connect(str(self.path), timeout=_BUSY_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            # Check and create under one write lock: a process opening the file at the same moment
            # sees either no tables or the whole schema, never a half-made cache it would set aside.
            conn.execute("BEGIN IMMEDIATE")
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "meta" not in tables:
                    raise _Foreign(f"it is an SQLite file with other tables ({sorted(tables)[:4]})")
                if "meta" in tables:
                    row = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
                    if row is None or row[0] != FORMAT:
                        raise _Foreign(f"format {row[0] if row else None!r}, expected {FORMAT!r}")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("PRAGMA journal_mode=WAL")   # readers and one writer at a time, no blocking reads
            conn.execute("SELECT count(*) FROM timings").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self._conn = self._open()
            except _Foreign as e:
                _move_aside(self.path, str(e))
                self._conn = self._open()
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                    raise CacheError(f"timing cache '{self.path}' stayed locked for {_BUSY_MS / 1000:.0f} s; "
                                     f"another process holds it — retry, or pass cache=False") from e
                _move_aside(self.path, f"{type(e).__name__}: {e}")
                self._conn = self._open()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- data --------------------------------------------------------------------------------------
    def get(self, key: dict) -> Optional[Measurement]:
        try:
            row = self.conn().execute(
                "SELECT median_s, iqr_s, n, min_s FROM timings WHERE " + " AND ".join(f"{k}=?" for k in _KEY),
                tuple(str(key[k]) for k in _KEY)).fetchone()
        except sqlite3.DatabaseError as e:
            self._recover(e)
            return None
        return Measurement(row[0], row[1], row[2], row[3]) if row else None

    def put(self, key: dict, m: Measurement) -> None:
        self.put_many([(key, m)])

    def put_many(self, items: Iterable[tuple[dict, Measurement]]) -> None:
        rows = [tuple(str(k[f]) for f in _KEY) + (m.median_s, m.iqr_s, m.n, m.min_s, time.time()) for k, m in items]
        if not rows:
            return
        try:
            c = self.conn()
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(f"INSERT OR REPLACE INTO timings VALUES ({', '.join('?' * 13)})", rows)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:
            self._recover(e)

    def _recover(self, e: sqlite3.DatabaseError) -> None:
        """A file that broke while open: locked -> CacheError; corrupted -> set aside, start over."""
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise CacheError(f"timing cache '{self.path}' stayed locked for {_BUSY_MS / 1000:.0f} s; "
                             f"retry, or pass cache=False") from e
        self.close()
        _move_aside(self.path, f"{type(e).__name__}: {e}")

    def info(self) -> dict:
        try:
            return self._info()
        except sqlite3.DatabaseError as e:
            self._recover(e)
            return self._info()

    def _info(self) -> dict:
        c = self.conn()
        n = c.execute("SELECT count(*) FROM timings").fetchone()[0]
        devices = [r[0] for r in c.execute("SELECT DISTINCT device FROM timings ORDER BY device")]
        layers = c.execute("SELECT count(DISTINCT signature || input_shape) FROM timings").fetchone()[0]
        size = sum(os.path.getsize(str(self.path) + s) for s in ("", "-wal") if os.path.exists(str(self.path) + s))
        return {"path": str(self.path), "entries": n, "layer_shapes": layers, "devices": devices,
                "size_bytes": size}

    def clear(self) -> int:
        try:
            return self._clear()
        except sqlite3.DatabaseError as e:
            self._recover(e)
            return 0

    def _clear(self) -> int:
        c = self.conn()
        n = c.execute("SELECT count(*) FROM timings").fetchone()[0]
        c.execute("DELETE FROM timings")
        return n


class _Foreign(Exception):
    """The file is a valid SQLite database that is not an lrd_fx timing cache."""


def make_key(*, device, dtype, memory_format: str, signature: str, input_shape, rank, objective: str) -> dict:
    return {"device": device_name(device), "torch_version": torch.__version__, "dtype": str(dtype),
            "memory_format": memory_format, "signature": signature,
            "input_shape": "x".join(str(int(d)) for d in input_shape), "rank": str(rank), "objective": objective}


def cache_info(path: Union[str, os.PathLike, None] = None) -> dict:
    """What `lrd-fx cache info` prints: path, entries, distinct layer shapes, devices, size in bytes."""
    p = Path(path).expanduser() if path else default_path()
    if not p.exists():
        return {"path": str(p), "entries": 0, "layer_shapes": 0, "devices": [], "size_bytes": 0}
    with TimingCache(p) as c:
        return c.info()


def cache_clear(path: Union[str, os.PathLike, None] = None) -> int:
    """Delete every timing in the cache (`lrd-fx cache clear`); returns how many were removed."""
    p = Path(path).expanduser() if path else default_path()
    if not p.exists():
        return 0
    with TimingCache(p) as c:
        return c.clear()
