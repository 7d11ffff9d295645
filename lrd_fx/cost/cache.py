"""Persistent SQLite timing cache: a second compile of the same model on the same machine measures nothing."""
from __future__ import annotations

import os
import platform
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from ..errors import CacheError, warn
from .timer import Measurement

FORMAT = "lrd_fx-timings/3"   # /2: min_s column; /3: scale column (timings rescaled into another frame)
_MARK = "lrd_fx-timings/"     # every lrd_fx cache's meta table holds a format starting with this
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCAN_BYTES = 1 << 22         # the meta row of a damaged cache is looked for in its first 4 MiB
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
    scale REAL NOT NULL DEFAULT 1.0,
    PRIMARY KEY (device, torch_version, dtype, memory_format, signature, input_shape, rank, objective)
);
"""
_KEY = ("device", "torch_version", "dtype", "memory_format", "signature", "input_shape", "rank", "objective")
_VALUES = ("median_s", "iqr_s", "n", "min_s", "created", "scale")
# median_s, iqr_s and min_s are always what the timer measured. scale != 1 marks a fine-stage timing that
# the search multiplied by `scale` to put it into the frame of the coarse stage it was compared with
# (search_ranks.time_with_refs); get() returns it in that frame, get(raw=True) as measured.


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


# --- is this file ours? ------------------------------------------------------------------------------
# lrd_fx only ever writes, moves or deletes a file that it created: an lrd_fx cache (meta table with an
# lrd_fx-timings format), an empty file, or a path with nothing there. Anything else -- a directory,
# another program's database, a text file -- is a CacheError and stays exactly as it was.

class _NotOurs(Exception):
    """The path holds something that is not an lrd_fx timing cache."""


class _Damaged(Exception):
    """An lrd_fx timing cache that cannot be used as it is (damaged, or another format version)."""


_FIX = "set LRD_FX_CACHE (or cache=) to a file of its own, e.g. '~/.cache/lrd_fx/timings.sqlite', or pass cache=False"


def _not_ours(path: Path, why) -> CacheError:
    return CacheError(f"timing cache '{path}' is not an lrd_fx timing cache ({why}); lrd_fx leaves it "
                      f"untouched: {_FIX}")


def _has_mark(path: Path) -> bool:
    """True when the file's first bytes hold an lrd_fx format string (the meta row of our cache)."""
    try:
        with open(path, "rb") as f:
            return _MARK.encode() in f.read(_SCAN_BYTES)
    except OSError:
        return False


def _check_file(path: Path) -> str:
    """What is at `path`, without opening it as a database: "missing", "empty" or "sqlite".
    Raises _NotOurs (a directory, a file that is not SQLite) or _Damaged (our cache, header destroyed)."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:
        raise _NotOurs(f"cannot inspect it: {e}") from e
    if path.is_dir():
        raise _NotOurs("it is a directory")
    if not path.is_file():
        raise _NotOurs("it is not a regular file")
    if st.st_size == 0:
        return "empty"      # what sqlite3.connect leaves before the schema is written: ours to fill
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise _NotOurs(f"cannot read it: {e}") from e
    if head != _SQLITE_MAGIC:
        if _has_mark(path):
            raise _Damaged("its SQLite header is destroyed")
        raise _NotOurs("it is not an SQLite database")
    return "sqlite"


def _inspect(conn: sqlite3.Connection, path: Path) -> str:
    """"new" (an SQLite file without tables) or "ok"; raises _NotOurs or _Damaged.
    sqlite3.OperationalError "locked" propagates; other database errors become _Damaged or _NotOurs."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return "new"
        if "meta" not in tables:
            raise _NotOurs(f"an SQLite database with the tables {sorted(tables)[:4]}")
        row = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        fmt = row[0] if row else None
        if not (isinstance(fmt, str) and fmt.startswith(_MARK)):
            raise _NotOurs(f"an SQLite database whose meta table holds format {fmt!r}")
        if fmt != FORMAT:
            raise _Damaged(f"format {fmt!r}, this lrd_fx reads {FORMAT!r}")
        if "timings" not in tables:
            raise _Damaged("it has no timings table")
        conn.execute("SELECT count(*) FROM timings").fetchone()
        return "ok"
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            raise
        if _has_mark(path):
            raise _Damaged(f"{type(e).__name__}: {e}") from e
        raise _NotOurs(f"an SQLite file lrd_fx cannot read: {e}") from e
    except sqlite3.DatabaseError as e:
        if _has_mark(path):
            raise _Damaged(f"{type(e).__name__}: {e}") from e
        raise _NotOurs(f"an SQLite file lrd_fx cannot read: {e}") from e


def _connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection that creates nothing beside the file.

    A read-only connection to a WAL database makes '-wal' and '-shm' files when they are absent; they
    are absent exactly when no writer has the file open, and then the file cannot change under the
    reader, so it is opened "immutable" (no journal files at all). With a writer active they exist
    and mode=ro shares them.
    """
    query = "mode=ro" if os.path.exists(str(path) + "-wal") else "immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{query}", uri=True, timeout=_BUSY_MS / 1000,
                           isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
    return conn


def _writable(path: Path) -> bool:
    """Can the file be written, and its directory take the '-wal' journal and a moved-aside copy?"""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _move_aside(path: Path, why: str) -> Path:
    dest = path.with_name(f"{path.name}.corrupt-{int(time.time())}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        try:
            os.replace(str(path) + suffix, str(dest) + suffix)
        except FileNotFoundError:
            pass    # another process moved it already, or there was no journal
    return dest


def _locked(path: Path, e: Exception) -> CacheError:
    return CacheError(f"timing cache '{path}' stayed locked for {_BUSY_MS / 1000:.0f} s; another process "
                      f"holds it: retry, or pass cache=False")


class TimingCache:
    """One SQLite file; every method is a short transaction, so several processes can share it.

    Odd paths: a directory or a file that is not an lrd_fx cache -> CacheError (nothing touched); a
    damaged lrd_fx cache (or one of another format version) -> moved aside with one warning and started
    anew; a read-only cache -> used for look-ups only, one warning; nowhere to write a new cache -> no
    cache (every look-up misses), one warning.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._conn: Optional[sqlite3.Connection] = None
        self.readonly = False     # look-ups only: the file (or its directory) cannot be written
        self.disabled = False     # no usable file: look-ups miss, nothing is written
        self._warned = False

    def _warn(self, msg: str) -> None:
        # one warning per cache object (one compile), however many look-ups and writes follow
        if not self._warned:
            self._warned = True
            warn(msg, RuntimeWarning)

    def _disable(self, why: str) -> None:
        self.disabled = True
        self._warn(f"lrd_fx timing cache '{self.path}': {why}; the rank search runs without a cache "
                   f"(every timing is measured). To keep timings, point LRD_FX_CACHE (or cache=) at a "
                   f"writable file; cache=False turns the cache off")

    # --- connection ------------------------------------------------------------------------------
    def conn(self) -> Optional[sqlite3.Connection]:
        """The open connection, or None when the cache is disabled."""
        if self._conn is None and not self.disabled:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> Optional[sqlite3.Connection]:
        p = self.path
        try:
            state = _check_file(p)
        except _NotOurs as e:
            raise _not_ours(p, e) from None
        except _Damaged as e:
            if not self._set_aside(str(e)):
                return None
            state = "missing"
        if state == "missing":
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._disable(f"cannot create its directory ({e})")
                return None
            if not os.access(p.parent, os.W_OK):
                self._disable(f"its directory '{p.parent}' is not writable")
                return None
        elif not _writable(p):
            return self._connect_readonly()
        for attempt in range(2):
            try:
                return self._open_rw()
            except _NotOurs as e:
                raise _not_ours(p, e) from None
            except _Damaged as e:
                if attempt:
                    self._disable(f"it is still unusable after being started anew ({e})")
                    return None
                if not self._set_aside(str(e)):
                    return None
            except sqlite3.OperationalError as e:
                if "locked" in str(e):
                    raise _locked(p, e) from e
                if "readonly" in str(e):          # a read-only mount: os.access cannot tell
                    return self._connect_readonly()
                self._disable(f"cannot open it ({e})")
                return None
        return None

    def _open_rw(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=_BUSY_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            # Check and create under one write lock: a process opening the file at the same moment
            # sees either no tables or the whole schema, never a half-made cache it would set aside.
            conn.execute("BEGIN IMMEDIATE")
            try:
                if _inspect(conn, self.path) == "new":
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
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_readonly(self) -> Optional[sqlite3.Connection]:
        p = self.path
        try:
            conn = _connect_ro(p)
        except sqlite3.Error as e:
            self._disable(f"it is read-only and cannot be opened for reading ({e})")
            return None
        try:
            state = _inspect(conn, p)
        except _NotOurs as e:
            conn.close()
            raise _not_ours(p, e) from None
        except _Damaged as e:
            conn.close()
            self._disable(f"it is damaged ({e}) and read-only, so it cannot be moved aside")
            return None
        except sqlite3.OperationalError as e:
            conn.close()
            raise _locked(p, e) from e
        if state != "ok":
            conn.close()
            self._disable("it is read-only and empty")
            return None
        self.readonly = True
        self._warn(f"lrd_fx timing cache '{p}' is read-only: its timings are used, new ones are not "
                   f"stored. To store them, point LRD_FX_CACHE (or cache=) at a writable file")
        return conn

    def _set_aside(self, why: str) -> bool:
        """Move a damaged lrd_fx cache out of the way (one warning); False when that is impossible."""
        if not os.access(self.path.parent, os.W_OK):
            self._disable(f"it is unusable ({why}) and its directory is not writable, so it stays as it is")
            return False
        self.close()
        try:
            dest = _move_aside(self.path, why)
        except OSError as e:
            self._disable(f"it is unusable ({why}) and could not be moved aside ({e})")
            return False
        self._warn(f"lrd_fx timing cache '{self.path}' is unusable ({why}); moved it to '{dest}' and "
                   f"starting a new one (timings will be measured again)")
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- data --------------------------------------------------------------------------------------
    def get(self, key: dict, *, raw: bool = False) -> Optional[Measurement]:
        """The stored timing of `key` (None: not stored). raw=False gives it in the frame the search
        used (rescaled fine-stage timings multiplied by their scale), raw=True as measured."""
        try:
            c = self.conn()
            if c is None:
                return None
            row = c.execute(
                "SELECT median_s, iqr_s, n, min_s, scale FROM timings WHERE " + " AND ".join(f"{k}=?" for k in _KEY),
                tuple(str(key[k]) for k in _KEY)).fetchone()
        except sqlite3.DatabaseError as e:
            self._recover(e)
            return None
        if row is None:
            return None
        m = Measurement(row[0], row[1], row[2], row[3])
        return m if raw else m.scaled(row[4])

    def is_rescaled(self, key: dict) -> Optional[bool]:
        """Whether the timing stored for `key` was rescaled by the search (None: not stored)."""
        c = self.conn()
        if c is None:
            return None
        row = c.execute("SELECT scale FROM timings WHERE " + " AND ".join(f"{k}=?" for k in _KEY),
                        tuple(str(key[k]) for k in _KEY)).fetchone()
        return None if row is None else row[0] != 1.0

    def put(self, key: dict, m: Measurement, scale: float = 1.0) -> None:
        self.put_many([(key, m, scale)])

    def put_many(self, items: Iterable[tuple]) -> None:
        """Store (key, Measurement) pairs, or (key, raw Measurement, scale) for rescaled timings."""
        now = time.time()
        rows = []
        for item in items:
            k, m = item[0], item[1]
            scale = float(item[2]) if len(item) > 2 else 1.0
            rows.append(tuple(str(k[f]) for f in _KEY) + (m.median_s, m.iqr_s, m.n, m.min_s, now, scale))
        if not rows:
            return
        try:
            c = self.conn()
            if c is None or self.readonly:
                return
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(f"INSERT OR REPLACE INTO timings ({', '.join(_KEY + _VALUES)}) "
                              f"VALUES ({', '.join('?' * len(_KEY + _VALUES))})", rows)
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:
            self._recover(e)

    def _recover(self, e: sqlite3.DatabaseError) -> None:
        """A file that broke while open: locked -> CacheError; read-only now -> look-ups only;
        damaged -> set aside (it was verified to be ours when opened), start over."""
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise _locked(self.path, e) from e
        if isinstance(e, sqlite3.OperationalError) and "readonly" in str(e):
            self.readonly = True
            self._warn(f"lrd_fx timing cache '{self.path}' became read-only ({e}); new timings are not stored")
            return
        if self.readonly:
            self.close()
            self._disable(f"it broke while in use ({type(e).__name__}: {e})")
            return
        self._set_aside(f"{type(e).__name__}: {e}")

    def info(self) -> dict:
        """What `lrd-fx cache info` prints (read-only: see cache_info)."""
        return cache_info(self.path)

    def clear(self) -> int:
        """Delete every timing; returns how many there were. CacheError when the file cannot be written."""
        c = self.conn()
        if c is None or self.readonly:
            raise CacheError(f"timing cache '{self.path}' cannot be cleared: it is read-only or unusable "
                             f"(see the warning above); delete the file yourself, or {_FIX}")
        try:
            n = c.execute("SELECT count(*) FROM timings").fetchone()[0]
            c.execute("DELETE FROM timings")
        except sqlite3.DatabaseError as e:
            self._recover(e)
            return 0
        return n


def make_key(*, device, dtype, memory_format: str, signature: str, input_shape, rank, objective: str,
             amp: Optional[str] = None, exec_form: str = "eager", tf32: Optional[str] = None) -> dict:
    """The row key of one timing. Autocast precision, TF32 settings (timer.tf32_state) and execution
    form ride in the dtype and objective columns ("torch.float32+autocast:bf16", "torch.float32+tf32
    matmul", "infer@cuda_graph"), so fp32 eager keys, and the rows measured before these existed, stay
    as they were and no schema change is needed."""
    return {"device": device_name(device), "torch_version": torch.__version__,
            "dtype": str(dtype) + (f"+autocast:{amp}" if amp else "") + (f"+{tf32}" if tf32 else ""),
            "memory_format": memory_format, "signature": signature,
            "input_shape": "x".join(str(int(d)) for d in input_shape), "rank": str(rank),
            "objective": objective + ("" if exec_form == "eager" else f"@{exec_form}")}


def _info_empty(p: Path) -> dict:
    return {"path": str(p), "entries": 0, "layer_shapes": 0, "devices": [], "rescaled": 0, "size_bytes": 0}


def cache_info(path: Union[str, os.PathLike, None] = None) -> dict:
    """What `lrd-fx cache info` prints: path, entries, distinct layer shapes, devices, rescaled entries,
    size in bytes. Read-only: creates, changes and moves nothing (a missing file reports 0 entries)."""
    p = Path(path).expanduser() if path else default_path()
    try:
        state = _check_file(p)
    except _NotOurs as e:
        raise _not_ours(p, e) from None
    except _Damaged as e:
        raise _damaged(p, e) from None
    if state != "sqlite":
        return _info_empty(p)
    for attempt in range(2):
        try:
            conn = _connect_ro(p)
        except sqlite3.Error as e:
            raise CacheError(f"cannot open timing cache '{p}' for reading: {e}") from e
        try:
            if _inspect(conn, p) == "new":
                return _info_empty(p)
            n = conn.execute("SELECT count(*) FROM timings").fetchone()[0]
            devices = [r[0] for r in conn.execute("SELECT DISTINCT device FROM timings ORDER BY device")]
            layers = conn.execute("SELECT count(DISTINCT signature || input_shape) FROM timings").fetchone()[0]
            rescaled = conn.execute("SELECT count(*) FROM timings WHERE scale != 1.0").fetchone()[0]
        except _NotOurs as e:
            raise _not_ours(p, e) from None
        except (_Damaged, sqlite3.DatabaseError) as e:
            if attempt == 0 and "locked" not in str(e):
                continue       # read "immutable" while a writer started: read again, sharing its journal
            if "locked" in str(e):
                raise _locked(p, e) from e
            raise _damaged(p, e) from None
        finally:
            conn.close()
        size = sum(os.path.getsize(str(p) + s) for s in ("", "-wal") if os.path.exists(str(p) + s))
        return {"path": str(p), "entries": n, "layer_shapes": layers, "devices": devices,
                "rescaled": rescaled, "size_bytes": size}
    raise AssertionError("unreachable")


def _damaged(p: Path, why) -> CacheError:
    return CacheError(f"timing cache '{p}' is damaged ({why}); the next compile moves it aside and starts a "
                      f"new one, `lrd-fx cache clear` does so now")


def cache_clear(path: Union[str, os.PathLike, None] = None) -> int:
    """Delete every timing in the cache (`lrd-fx cache clear`); returns how many were removed.
    A missing file stays missing; a damaged lrd_fx cache is moved aside (0 removed)."""
    p = Path(path).expanduser() if path else default_path()
    try:
        if _check_file(p) == "missing":
            return 0
    except _NotOurs as e:
        raise _not_ours(p, e) from None
    except _Damaged:
        pass                     # TimingCache moves it aside, with its warning
    with TimingCache(p) as c:
        return c.clear()
