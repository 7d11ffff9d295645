"""SQLite timing cache: keys, hits and misses, concurrent writers, corrupted and foreign files."""
import multiprocessing as mp
import os
import sqlite3

import pytest

from lrd_fx.cost import cache
from lrd_fx.cost.timer import Measurement


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


def test_corrupted_file_is_moved_aside(tmp_path):
    p = tmp_path / "c.sqlite"
    p.write_bytes(b"this is not a database" * 100)
    with pytest.warns(RuntimeWarning, match="moved it to"):
        with cache.TimingCache(p) as c:
            assert c.get(key()) is None
            c.put(key(), Measurement(1.0, 0.0, 1))
            assert c.get(key()).median_s == 1.0
    aside = [f for f in os.listdir(tmp_path) if ".corrupt-" in f]
    assert aside and (tmp_path / aside[0]).read_bytes().startswith(b"this is not")


def test_foreign_sqlite_file_is_moved_aside(tmp_path):
    p = tmp_path / "c.sqlite"
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE timings (x)")      # same table name, other schema
    con.commit()
    con.close()
    with pytest.warns(RuntimeWarning, match="other tables"):
        assert cache.cache_info(p)["entries"] == 0
    with cache.TimingCache(p) as c:               # now a proper cache: no further warning
        c.put(key(), Measurement(1.0, 0.0, 1))


def test_other_format_version_is_moved_aside(tmp_path):
    p = tmp_path / "c.sqlite"
    with cache.TimingCache(p) as c:
        c.conn().execute("UPDATE meta SET value='lrd_fx-timings/1' WHERE key='format'")
    with pytest.warns(RuntimeWarning, match="format"):
        with cache.TimingCache(p) as c:
            assert c.get(key()) is None


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
