"""SQLite timing cache: keys, hits and misses, concurrent writers; odd paths (directories, foreign, damaged,
read-only and unwritable files) where it touches only what it created."""
import multiprocessing as mp
import os
import sqlite3

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.cost import cache
from lrd_fx.cost.timer import Measurement, use_cost_fn
from lrd_fx.errors import CacheError


def key(**over):
    k = dict(device="cpu", dtype="torch.float32", memory_format="contiguous",
             signature="Conv2d|64x64x3x3", input_shape=(8, 64, 14, 14), rank="32/32", objective="infer")
    k.update(over)
    return cache.make_key(**k)


def test_path_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("LRD_FX_CACHE", str(tmp_path / "x.sqlite"))
    assert cache.default_path() == tmp_path / "x.sqlite"
    assert cache.resolve(True) == tmp_path / "x.sqlite"
    assert cache.resolve(False) is None
    assert cache.resolve(str(tmp_path / "y.sqlite")) == tmp_path / "y.sqlite"
    monkeypatch.delenv("LRD_FX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_path() == tmp_path / "xdg" / "lrd_fx" / "timings.sqlite"


def test_hit_and_miss(tmp_path):
    with cache.TimingCache(tmp_path / "c.sqlite") as c:
        assert c.get(key()) is None
        c.put(key(), Measurement(0.01, 0.001, 7))
        c.put(key(rank="1/1"), Measurement(0.01, 0.001, 7, 0.008))
        assert c.get(key(rank="1/1")) == Measurement(0.01, 0.001, 7, 0.008)
        for other in (dict(rank="31/31"), dict(objective="train"), dict(input_shape=(4, 64, 14, 14)),
                      dict(dtype="torch.float16"), dict(memory_format="channels_last")):
            assert c.get(key(**other)) is None, other
    with cache.TimingCache(tmp_path / "c.sqlite") as c:   # persisted
        assert c.get(key()).median_s == 0.01


def test_key_names_device_and_torch_version():
    import torch
    k = key()
    assert k["torch_version"] == torch.__version__
    assert k["device"].startswith("cpu:") and "threads=" in k["device"]
    assert k["input_shape"] == "8x64x14x14"


def test_info_and_clear(tmp_path):
    p = tmp_path / "c.sqlite"
    assert cache.cache_info(p)["entries"] == 0 and not p.exists()
    with cache.TimingCache(p) as c:
        c.put_many([(key(rank=str(r)), Measurement(r, 0.0, 1)) for r in range(5)])
    info = cache.cache_info(p)
    assert info["entries"] == 5 and info["layer_shapes"] == 1 and info["path"] == str(p)
    assert info["size_bytes"] > 0 and len(info["devices"]) == 1
    assert cache.cache_clear(p) == 5
    assert cache.cache_info(p)["entries"] == 0


def test_default_path_from_env(tmp_path):
    # conftest points LRD_FX_CACHE at a temporary file
    assert cache.cache_info()["path"] == os.environ["LRD_FX_CACHE"]


def _real_cache(p, n=50):
    with cache.TimingCache(p) as c:
        c.put_many([(key(rank=str(r)), Measurement(float(r), 0.0, 1)) for r in range(n)])
    return p.read_bytes()


def _snapshot(d):
    """Every file under d with its bytes and mtime: equal iff nothing was created, changed or moved."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            f = os.path.join(root, name)
            st = os.stat(f)
            out[f] = (st.st_mtime_ns, open(f, "rb").read() if os.path.isfile(f) else None)
    return out


def _damage(data: bytes, how: str) -> bytes:
    if how == "header":             # the SQLite header is gone, our meta row is still in the file
        return b"\0" * 16 + data[16:]
    if how == "btree":              # page 1's b-tree header overwritten: "database disk image is malformed"
        return data[:100] + b"\xff" * 200 + data[300:]
    return data[: len(data) // 3]   # truncated


@pytest.mark.parametrize("how", ["header", "btree", "truncated"])
def test_damaged_lrd_fx_cache_is_moved_aside_with_one_warning(tmp_path, how):
    p = tmp_path / "c.sqlite"
    bad = _damage(_real_cache(p), how)
    p.write_bytes(bad)
    with pytest.warns(RuntimeWarning, match="moved it to") as rec:
        with cache.TimingCache(p) as c:
            for _ in range(20):
                assert c.get(key()) is None
            c.put(key(), Measurement(1.0, 0.0, 1))
            assert c.get(key()).median_s == 1.0
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    aside = [f for f in os.listdir(tmp_path) if ".corrupt-" in f and not f.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == bad
    assert cache.cache_info(p)["entries"] == 1


def _assert_cache_error_leaves_it(path, tmp_path, *calls):
    before = _snapshot(tmp_path)
    for call in calls:
        with pytest.raises(CacheError) as e:
            call()
        msg = str(e.value)
        assert str(path) in msg and "LRD_FX_CACHE" in msg and "cache=False" in msg, msg
    assert _snapshot(tmp_path) == before        # nothing renamed, created or written


def _all_entry_points(path, monkeypatch):
    from lrd_fx.cli import main

    def compile_with_cache():
        with use_cost_fn(Tagged()):
            lrd_fx.compile(nn.Sequential(nn.Linear(32, 32)), (torch.randn(2, 32),), rank=8,
                           rank_search="infer", progress=False, cache=str(path))

    def env_compile():
        monkeypatch.setenv("LRD_FX_CACHE", str(path))
        with use_cost_fn(Tagged()):
            lrd_fx.compile(nn.Sequential(nn.Linear(32, 32)), (torch.randn(2, 32),), rank=8,
                           rank_search="infer", progress=False)

    def cli_info():
        # the CLI prints the CacheError and exits 2; re-raise it for the check
        import io
        import contextlib
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["cache", "info", "--path", str(path)])
        assert rc == 2
        raise CacheError(err.getvalue())

    return [lambda: cache.TimingCache(path).get(key()), lambda: cache.TimingCache(path).put(key(), Measurement(1, 0, 1)),
            lambda: cache.cache_info(path), lambda: cache.cache_clear(path), compile_with_cache, env_compile, cli_info]


class Tagged:
    """A cost function whose timings go to the cache (cache_tag), counting its calls."""
    cache_tag = "test-cache"

    def __init__(self):
        self.calls = 0

    def __call__(self, module, shape, mode):
        self.calls += 1
        return 1.0 if isinstance(module, nn.Linear) else 0.5


def test_directory_is_never_moved(tmp_path, monkeypatch):
    d = tmp_path / "mydir"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    _assert_cache_error_leaves_it(d, tmp_path, *_all_entry_points(d, monkeypatch))
    assert (d / "notes.txt").read_text() == "mine"


def test_other_applications_sqlite_file_is_never_touched(tmp_path, monkeypatch):
    for i, ddl in enumerate(["CREATE TABLE timings (x)",                     # same table name, other schema
                             "CREATE TABLE users (name TEXT)",
                             "CREATE TABLE meta (key TEXT, value TEXT); INSERT INTO meta VALUES ('format', 'app/1')"]):
        p = tmp_path / f"app{i}.db"
        con = sqlite3.connect(p)
        con.executescript(ddl)
        con.commit()
        con.close()
        _assert_cache_error_leaves_it(p, tmp_path, *_all_entry_points(p, monkeypatch))


def test_text_file_is_never_touched(tmp_path, monkeypatch):
    p = tmp_path / "notes.txt"
    p.write_text("this is not a database\n" * 100)
    _assert_cache_error_leaves_it(p, tmp_path, *_all_entry_points(p, monkeypatch))


def test_other_format_version_is_moved_aside(tmp_path):
    p = tmp_path / "c.sqlite"
    with cache.TimingCache(p) as c:
        c.conn().execute("UPDATE meta SET value='lrd_fx-timings/1' WHERE key='format'")
    with pytest.warns(RuntimeWarning, match="format") as rec:
        with cache.TimingCache(p) as c:
            assert c.get(key()) is None
    assert len(rec) == 1


def test_empty_file_becomes_a_cache(tmp_path):
    # what sqlite3.connect leaves before the schema is written (another process creating it): ours
    p = tmp_path / "c.sqlite"
    p.write_bytes(b"")
    with cache.TimingCache(p) as c:
        c.put(key(), Measurement(2.0, 0.0, 1))
    assert cache.cache_info(p)["entries"] == 1


def _deny_writes(monkeypatch, *paths):
    """Make os.access report these paths as not writable. The tests run as root, for whom chmod does not
    stop writes, so what is checked is lrd_fx's read-only code path, chosen from os.access."""
    real = os.access
    denied = {os.path.abspath(str(p)) for p in paths}

    def access(path, mode, *a, **kw):
        if mode & os.W_OK and os.path.abspath(str(path)) in denied:
            return False
        return real(path, mode, *a, **kw)
    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("deny", ["file", "dir", "both"])
def test_read_only_cache_is_used_for_look_ups_and_never_written(tmp_path, monkeypatch, deny):
    p = tmp_path / "c.sqlite"
    data = _real_cache(p, n=5)
    _deny_writes(monkeypatch, *{"file": [p], "dir": [tmp_path], "both": [p, tmp_path]}[deny])
    before = _snapshot(tmp_path)
    with pytest.warns(RuntimeWarning, match="read-only") as rec:
        with cache.TimingCache(p) as c:
            assert c.get(key(rank="3")).median_s == 3.0           # look-ups work
            for r in range(5, 40):
                assert c.get(key(rank=str(r))) is None
                c.put(key(rank=str(r)), Measurement(1.0, 0.0, 1))   # and writes are dropped
            assert c.readonly
    assert len(rec) == 1
    assert _snapshot(tmp_path) == before and p.read_bytes() == data   # not even -wal/-shm files
    assert cache.cache_info(p)["entries"] == 5


def test_warm_read_only_cache_serves_a_compile(tmp_path, monkeypatch):
    # issue 10: a read-only cache in a read-only directory failed the compile with PassError(PermissionError)
    p = tmp_path / "c.sqlite"
    model, x = nn.Sequential(nn.Linear(32, 32)), torch.randn(2, 32)
    first = Tagged()
    with use_cost_fn(first):
        gm1 = lrd_fx.compile(model, (x,), rank=8, rank_search="infer", progress=False, cache=str(p))
    assert first.calls > 0
    _deny_writes(monkeypatch, p, tmp_path)
    before = _snapshot(tmp_path)
    second = Tagged()
    with pytest.warns(RuntimeWarning, match="read-only") as rec, use_cost_fn(second):
        gm2 = lrd_fx.compile(model, (x,), rank=8, rank_search="infer", progress=False, cache=str(p))
    assert second.calls == 0 and gm2.lrd.plan["0"]["ranks"] == gm1.lrd.plan["0"]["ranks"]
    assert len([w for w in rec if "timing cache" in str(w.message)]) == 1
    assert _snapshot(tmp_path) == before


def test_no_writable_place_runs_without_cache_and_warns_once(tmp_path, monkeypatch):
    # issue 10: a new cache in a non-writable directory gave 116 warnings that a file "was moved"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    nowhere = blocker / "sub" / "c.sqlite"          # its directory cannot be created: a file is in the way
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 24))
    fake = Tagged()
    with pytest.warns(RuntimeWarning, match="without a cache") as rec, use_cost_fn(fake):
        gm = lrd_fx.compile(model, (torch.randn(2, 32),), rank=8, rank_search="infer", progress=False,
                            cache=str(nowhere))
    assert fake.calls > 10 and gm.lrd.plan["0"]["decision"] == "searched"   # chains cost 0.5, originals 1
    assert len([w for w in rec if "timing cache" in str(w.message)]) == 1
    assert not (blocker.parent / "a_file.corrupt").exists() and blocker.read_text() == "x"
    # a directory that exists but is not writable: same, and nothing is created there
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    _deny_writes(monkeypatch, ro_dir)
    with pytest.warns(RuntimeWarning, match="not writable") as rec:
        with cache.TimingCache(ro_dir / "c.sqlite") as c:
            for r in range(50):
                assert c.get(key(rank=str(r))) is None
                c.put(key(rank=str(r)), Measurement(1.0, 0.0, 1))
    assert len(rec) == 1 and os.listdir(ro_dir) == []


def test_cache_info_never_writes(tmp_path):
    missing = tmp_path / "no" / "such" / "c.sqlite"
    assert cache.cache_info(missing)["entries"] == 0
    assert not (tmp_path / "no").exists()                        # nothing created, not even the directory
    p = tmp_path / "c.sqlite"
    _real_cache(p, n=7)
    before = _snapshot(tmp_path)
    for _ in range(3):
        assert cache.cache_info(p)["entries"] == 7
    assert _snapshot(tmp_path) == before                         # no -wal/-shm left beside it either
    # while a writer holds the file open (its -wal exists), info reads through the writer's journal
    with cache.TimingCache(p) as c:
        c.put(key(rank="new"), Measurement(1.0, 0.0, 1))
        assert cache.cache_info(p)["entries"] == 8
    # a damaged cache is reported, not moved
    p.write_bytes(_damage(p.read_bytes(), "btree"))
    before = _snapshot(tmp_path)
    with pytest.raises(CacheError, match="damaged.*next compile moves it aside"):
        cache.cache_info(p)
    assert _snapshot(tmp_path) == before


def test_cache_clear_creates_nothing(tmp_path):
    assert cache.cache_clear(tmp_path / "none.sqlite") == 0 and os.listdir(tmp_path) == []


def test_rescaled_timings_are_marked(tmp_path):
    p = tmp_path / "c.sqlite"
    with cache.TimingCache(p) as c:
        c.put_many([(key(rank="1"), Measurement(2.0, 0.2, 3, 1.8)),
                    (key(rank="2"), Measurement(2.0, 0.2, 3, 1.8), 0.5)])
        assert c.get(key(rank="1")) == c.get(key(rank="1"), raw=True) == Measurement(2.0, 0.2, 3, 1.8)
        assert c.get(key(rank="2"), raw=True) == Measurement(2.0, 0.2, 3, 1.8)   # as measured
        assert c.get(key(rank="2")) == Measurement(1.0, 0.1, 3, 0.9)             # in the search's frame
        assert c.is_rescaled(key(rank="1")) is False and c.is_rescaled(key(rank="2")) is True
        assert c.is_rescaled(key(rank="3")) is None
    assert cache.cache_info(p)["rescaled"] == 1


def _writer(path, tag, n, start):
    from lrd_fx.cost import cache as c_mod
    from lrd_fx.cost.timer import Measurement as M
    start.wait()
    with c_mod.TimingCache(path) as c:
        for i in range(n):   # one transaction per entry: many interleaved writes
            c.put(key(rank=f"{tag}{i}"), M(float(i), 0.0, 1))


def test_two_processes_write_at_once(tmp_path):
    p = str(tmp_path / "c.sqlite")
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(p, tag, 150, start)) for tag in "ab"]
    for q in procs:
        q.start()
    start.set()
    for q in procs:
        q.join(120)
    assert [q.exitcode for q in procs] == [0, 0]
    assert cache.cache_info(p)["entries"] == 300
    with cache.TimingCache(p) as c:
        assert c.get(key(rank="a149")).median_s == 149.0 and c.get(key(rank="b0")).median_s == 0.0
