"""The PostgreSQL connector against a real server (tests/services/postgres.py): the source's
parallel ranges, pruning and filter pushdown against the table's contents; the batch
writer's modes; the streaming upsert and append sinks against plain-Python oracles, on
both executors, exactly once under a SIGKILLed task and under crashes at every fault
point; clear errors for an unreachable server and for sinks that cannot take a result."""

from __future__ import annotations

import datetime as dt
import decimal
import os
import random
import re
import signal
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pytest
from faults import HeldRows
from services.process import free_port

import millstream as ms
from millstream.errors import PlanError
from millstream.io.postgres import PostgresError, PostgresSink, PostgresSource
from millstream.testing import TestSource, crash_and_restore

pytestmark = pytest.mark.postgres

N = 1000


def _table(postgres, name: str) -> None:
    postgres.execute(f"DROP TABLE IF EXISTS {name}")
    postgres.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, k text, v double precision, "
                     f"d date, ts timestamptz, amount numeric(10, 2), doc jsonb)")
    postgres.execute(
        f"INSERT INTO {name} SELECT i, 'k' || (i % 7), CASE WHEN i % 10 = 0 THEN NULL ELSE "
        f"i / 4.0 END, DATE '2024-01-01' + (i % 100), TIMESTAMPTZ '2024-01-01 00:00:00+00' "
        f"+ i * INTERVAL '1 minute', i * 1.25, jsonb_build_object('i', i) "
        f"FROM generate_series(1, {N}) AS i")


def _expected(i: int) -> dict[str, Any]:
    return {"id": i, "k": f"k{i % 7}", "v": None if i % 10 == 0 else i / 4.0,
            "d": dt.date(2024, 1, 1) + dt.timedelta(days=i % 100),
            "ts": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=i),
            "amount": decimal.Decimal(i) * decimal.Decimal("1.25"),
            "doc": f'{{"i": {i}}}'}


# ----------------------------------------------------------------------------- source


def test_schema_is_known_when_the_dataset_is_made(postgres):
    _table(postgres, "src_schema")
    ds = ms.read_postgres(postgres.dsn, "src_schema")
    assert ds.schema == pa.schema([
        ("id", pa.int64()), ("k", pa.string()), ("v", pa.float64()), ("d", pa.date32()),
        ("ts", pa.timestamp("us", tz="UTC")), ("amount", pa.decimal128(10, 2)),
        ("doc", pa.string())])


@pytest.mark.parametrize("column,parts", [(None, 1), ("id", 4), ("d", 3), ("ts", 5),
                                          ("amount", 2)])
def test_splits_read_every_row_once(postgres, column, parts):
    _table(postgres, "src_splits")
    src = PostgresSource(postgres.dsn, "src_splits", partition_column=column,
                         num_partitions=parts if column else None)
    splits = src.plan_splits(2)
    assert len(splits) == parts
    rows = [r for s in splits for b in src.read_split(s, None) for r in b.to_pylist()]
    assert sorted(rows, key=lambda r: r["id"]) == [_expected(i) for i in range(1, N + 1)]
    # a task per split, through the Dataset
    got = ms.read_postgres(postgres.dsn, "src_splits", partition_column=column,
                           num_partitions=parts if column else None).collect()
    assert sorted(r["id"] for r in got) == list(range(1, N + 1))


def test_bounds_inside_the_data_still_read_every_row(postgres):
    _table(postgres, "src_bounds")
    postgres.execute("INSERT INTO src_bounds (id, k) VALUES (5000, NULL)")
    postgres.execute("UPDATE src_bounds SET amount = NULL WHERE id < 20")
    ds = ms.read_postgres(postgres.dsn, "src_bounds", partition_column="amount",
                          num_partitions=4, lower_bound=100, upper_bound=200)
    assert len(ds._node.source.plan_splits(2)) == 4
    assert sorted(r["id"] for r in ds.collect()) == [*range(1, N + 1), 5000]


def test_a_query_with_pruning_and_filters_pushed(postgres):
    _table(postgres, "src_push")
    ds = (ms.read_postgres(postgres.dsn, "SELECT * FROM src_push WHERE id <= 500",
                           partition_column="id", num_partitions=3)
          .filter((ms.col("k") >= "k3") & (ms.col("d") < dt.date(2024, 2, 1))
                  & ms.col("v").is_not_null())
          .select("id", "k"))
    text = ds.explain(print_plan=False)
    pruned = re.search(r"partition_column=id columns=\[([^\]]*)\]", text)
    assert pruned and sorted(pruned.group(1).replace("'", "").split(", ")) == \
        ["d", "id", "k", "v"], text
    assert 'COLLATE "C" >= %s' in text, text
    want = sorted(i for i in range(1, 501) if f"k{i % 7}" >= "k3"
                  and dt.date(2024, 1, 1) + dt.timedelta(days=i % 100) < dt.date(2024, 2, 1)
                  and i % 10 != 0)
    got = ds.collect()
    assert sorted(r["id"] for r in got) == want
    assert set(got[0]) == {"id", "k"}


def test_a_limit_reads_less(postgres):
    _table(postgres, "src_limit")
    ds = ms.read_postgres(postgres.dsn, "src_limit", partition_column="id", num_partitions=4)
    assert "limit=5" in ds.limit(5).explain(print_plan=False)
    rows = ds.limit(5).collect()
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5


def test_pushed_filters_leave_the_same_rows_as_arrow(postgres):
    """Random conjunctions of comparisons, null tests and is_in, with and without the
    optimizer (no pushdown): the same rows."""
    _table(postgres, "src_random")
    rng = random.Random(7)
    ds = ms.read_postgres(postgres.dsn, "src_random")
    for _ in range(12):
        parts = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["id", "k", "v", "null", "in", "d", "or"])
            if kind == "id":
                parts.append(getattr(ms.col("id"), rng.choice(["__lt__", "__ge__", "__ne__"]))(
                    rng.randint(0, N)))
            elif kind == "k":
                parts.append(ms.col("k") <= f"k{rng.randint(0, 7)}")
            elif kind == "v":
                parts.append(ms.col("v") > rng.random() * 200)
            elif kind == "null":
                parts.append(ms.col("v").is_null() | (ms.col("id") < 50))
            elif kind == "in":
                parts.append(ms.col("k").is_in(["k1", "k4", "zz"]))
            elif kind == "d":
                parts.append(ms.col("d") >= dt.date(2024, 1, rng.randint(1, 28)))
            else:
                parts.append(~(ms.col("id") > 900) | (ms.col("k") == "k2"))
        pred = parts[0]
        for p in parts[1:]:
            pred = pred & p
        q = ds.filter(pred).select("id")
        assert sorted(r["id"] for r in q.collect()) == \
            sorted(r["id"] for r in q.collect(optimizer=False)), repr(pred)


def test_a_reference_table_joins_a_stream(postgres):
    postgres.execute("DROP TABLE IF EXISTS ref_names")
    postgres.execute("CREATE TABLE ref_names (k text PRIMARY KEY, name text)")
    postgres.execute("INSERT INTO ref_names VALUES ('a', 'Alpha'), ('b', 'Beta')")
    src = TestSource(pa.schema([("k", pa.string()), ("n", pa.int64())]))
    src.add([{"k": "a", "n": 1}, {"k": "b", "n": 2}, {"k": "c", "n": 3}])
    src.close()
    sink = ms.testing.CollectingSink()
    job = src.dataset().join(ms.read_postgres(postgres.dsn, "ref_names"), on="k").start(
        sink=sink, checkpoint_interval=0)
    assert job.await_termination(60)
    assert sorted((r["k"], r["name"]) for r in sink.rows()) == [("a", "Alpha"), ("b", "Beta")]


# ----------------------------------------------------------------------------- batch sink


def test_write_postgres_modes(postgres):
    postgres.execute("DROP TABLE IF EXISTS w_modes")
    rows = [{"id": i, "name": f"n{i}", "ts": dt.datetime(2024, 1, 1, i % 24),
             "blob": bytes([i % 256, 0, 1]), "tags": [i, i + 1]} for i in range(200)]
    ms.from_items(rows, num_partitions=3).write_postgres(postgres.dsn, "w_modes")
    assert postgres.query("SELECT count(*), sum(id) FROM w_modes") == [(200, sum(range(200)))]
    assert postgres.query("SELECT name, ts, blob, tags FROM w_modes WHERE id = 5") == \
        [("n5", dt.datetime(2024, 1, 1, 5), b"\x05\x00\x01", [5, 6])]
    ms.from_items(rows[:10]).write_postgres(postgres.dsn, "w_modes", mode="append")
    assert postgres.query("SELECT count(*) FROM w_modes") == [(210,)]
    ms.from_items(rows[:10]).write_postgres(postgres.dsn, "w_modes", mode="overwrite")
    assert postgres.query("SELECT count(*) FROM w_modes") == [(10,)]
    postgres.execute("ALTER TABLE w_modes ADD PRIMARY KEY (id)")
    ms.from_items([{**r, "name": "new"} for r in rows[5:15]]).write_postgres(
        postgres.dsn, "w_modes", mode="upsert", key="id")
    assert postgres.query("SELECT count(*), count(*) FILTER (WHERE name = 'new') "
                          "FROM w_modes") == [(15, 10)]
    # nothing staged is left behind
    assert postgres.query('SELECT count(*) FROM "w_modes__ms_staging"') == [(0,)]


def test_a_failed_batch_write_leaves_the_table_as_it_was(postgres):
    postgres.execute("DROP TABLE IF EXISTS w_fail")
    ms.from_items([{"id": 1}]).write_postgres(postgres.dsn, "w_fail")

    def boom(r):
        if r["id"] == 150:
            raise ValueError("no")
        return r

    with pytest.raises(Exception, match="no"):
        ms.from_items([{"id": i} for i in range(200)], num_partitions=2).map(boom) \
            .write_postgres(postgres.dsn, "w_fail", mode="overwrite", max_task_attempts=1)
    assert postgres.query("SELECT id FROM w_fail") == [(1,)]


# ----------------------------------------------------------------------------- stream sinks

SCHEMA = pa.schema([("id", pa.int64()), ("cat", pa.string()), ("v", pa.int64())])


def _events(seed: int, n: int, ids: int = 60, cats: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": rng.randrange(ids), "cat": f"c{rng.randrange(cats)}", "v": rng.randint(-5, 50)}
            for _ in range(n)]


def _per_category(ds: ms.Dataset) -> ms.Dataset:
    """The latest row per id, summed per category: a category whose ids all moved to
    others is deleted (the aggregate retracts its last row)."""
    return (ds.drop_duplicates("id", keep="last").group_by("cat")
            .agg(ms.sum("v").alias("total"), ms.count().alias("n")))


def _per_category_oracle(rows: list[dict]) -> dict[str, tuple[int, int]]:
    last = {}
    for r in rows:
        last[r["id"]] = r
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in last.values():
        out[r["cat"]][0] += r["v"]
        out[r["cat"]][1] += 1
    return {c: (t, n) for c, (t, n) in out.items()}


def _upsert_table(postgres, name: str) -> None:
    postgres.execute(f"DROP TABLE IF EXISTS {name}")
    postgres.execute(f"DROP TABLE IF EXISTS {name}__ms_staging")
    postgres.execute(f"CREATE TABLE {name} (cat text PRIMARY KEY, total bigint, n bigint)")


def _table_rows(postgres, name: str) -> dict[str, tuple[int, int]]:
    return {c: (t, n) for c, t, n in postgres.query(f"SELECT cat, total, n FROM {name}")}


def _source(rows: list[dict], partitions: int = 1, chunk: int = 25) -> TestSource:
    src = TestSource(schema=SCHEMA, partitions=partitions)
    for i in range(0, len(rows), chunk):
        src.add(rows[i:i + chunk], partition=(i // chunk) % partitions)
    src.close()
    return src


def test_upsert_sink_final_values_per_key(postgres, executor):
    rows = _events(1, 1500, ids=40, cats=6)
    # moves that empty categories: c5 only ever holds ids that later move to c0
    rows += [{"id": 1000 + i, "cat": "c5", "v": 3} for i in range(5)]
    rows += [{"id": 1000 + i, "cat": "c0", "v": 1} for i in range(5)]
    rows = [r for r in rows if not (r["cat"] == "c5" and r["id"] < 1000)]
    name = f"up_{executor}"
    _upsert_table(postgres, name)
    job = _per_category(_source(rows, partitions=1).dataset()).start(
        sink=ms.postgres_sink(postgres.dsn, name, key="cat"), executor=executor,
        checkpoint_interval="30ms", parallelism=2)
    assert job.await_termination(120)
    want = _per_category_oracle(rows)
    assert "c5" not in want
    assert _table_rows(postgres, name) == want
    assert postgres.query(f'SELECT count(*) FROM "{name}__ms_staging"') == [(0,)]


def test_upsert_sink_creates_its_table(postgres):
    postgres.execute("DROP TABLE IF EXISTS up_created")
    rows = _events(2, 300)
    job = _per_category(_source(rows).dataset()).start(
        sink=ms.postgres_sink(postgres.dsn, "up_created", key=["cat"], create_table=True),
        executor="inline", checkpoint_interval=0)
    assert job.await_termination(60)
    assert _table_rows(postgres, "up_created") == _per_category_oracle(rows)
    assert postgres.query("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON "
                          "a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE "
                          "i.indrelid = 'up_created'::regclass AND i.indisprimary") == [("cat",)]


@pytest.mark.parametrize("point", ["during_epoch", "before_checkpoint", "after_checkpoint",
                                   "after_commit"])
def test_crash_and_restore_at_every_point_is_exactly_once(postgres, tmp_path, point):
    rows = _events(3, 800)
    name = f"up_crash_{point}"
    _upsert_table(postgres, name)
    postgres.execute(f"DROP TABLE IF EXISTS {name}_log")
    postgres.execute(f"CREATE TABLE {name}_log (id bigint, cat text, v bigint, seq bigint)")
    ds = _source(rows).dataset()
    crash_and_restore(_per_category(ds), checkpoint=str(tmp_path / "chk"),
                      sink=ms.postgres_sink(postgres.dsn, name, key="cat"), crash_epoch=3,
                      point=point, executor="inline", checkpoint_interval=0)
    assert _table_rows(postgres, name) == _per_category_oracle(rows)
    # an append table gets every row exactly once
    seq = pa.schema([*SCHEMA, ("seq", pa.int64())])
    src = TestSource(schema=seq)
    for i in range(0, len(rows), 25):
        src.add([{**r, "seq": i + j} for j, r in enumerate(rows[i:i + 25])])
    src.close()
    crash_and_restore(src.dataset(), checkpoint=str(tmp_path / "chk2"),
                      sink=ms.postgres_sink(postgres.dsn, f"{name}_log"), crash_epoch=3,
                      point=point, executor="inline", checkpoint_interval=0)
    assert sorted(s for (s,) in postgres.query(f"SELECT seq FROM {name}_log")) == \
        list(range(len(rows)))


def test_a_killed_task_is_exactly_once_in_postgres(postgres, tmp_path):
    """SIGKILL of a slot process of the parallel executor in the middle of the job (half
    the input held back until the kill): every category's final value is right, and the
    append table holds every row exactly once."""
    rows = [{**r, "seq": i} for i, r in enumerate(_events(4, 4000, ids=300, cats=20))]
    _upsert_table(postgres, "kill_up")
    postgres.execute("DROP TABLE IF EXISTS kill_log")
    postgres.execute("CREATE TABLE kill_log (seq bigint, id bigint, cat text)")
    def totals(ds: ms.Dataset) -> ms.Dataset:  # (independent of the arrival order)
        return ds.group_by("cat").agg(ms.sum("v").alias("total"), ms.count().alias("n"))

    for name, make, sink in [
            ("kill_up", totals, ms.postgres_sink(postgres.dsn, "kill_up", key="cat")),
            ("kill_log", lambda ds: ds.select("seq", "id", "cat"),
             ms.postgres_sink(postgres.dsn, "kill_log", mode="append"))]:
        held = HeldRows(rows, partitions=2, chunk=40)
        job = make(held.dataset()).start(checkpoint=str(tmp_path / name), executor="parallel",
                                         parallelism=2, sink=sink, checkpoint_interval="50ms")
        held.wait_until_checkpointed(job)
        os.kill(job.host_pids()[-1], signal.SIGKILL)
        held.release()
        assert job.await_termination(120)
        assert job.metrics()["restarts"] == 1
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        want[r["cat"]][0] += r["v"]
        want[r["cat"]][1] += 1
    assert _table_rows(postgres, "kill_up") == {c: tuple(v) for c, v in want.items()}
    assert Counter(s for (s,) in postgres.query("SELECT seq FROM kill_log")) == \
        Counter(r["seq"] for r in rows)


# ----------------------------------------------------------------------------- errors


def test_an_unreachable_server_is_a_clear_error_within_seconds():
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x user=x connect_timeout=2"
    t0 = time.monotonic()
    with pytest.raises(PostgresError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:"):
        ms.read_postgres(dsn, "t")
    src = TestSource(schema=SCHEMA)
    src.add([{"id": 1, "cat": "a", "v": 1}])
    src.close()
    job = src.dataset().start(sink=ms.postgres_sink(dsn, "t"), executor="inline",
                              checkpoint_interval=0)
    with pytest.raises(PostgresError, match="cannot connect to PostgreSQL"):
        job.await_termination(30)
    assert time.monotonic() - t0 < 20


def test_sinks_that_cannot_take_the_result_are_refused(postgres):
    _upsert_table(postgres, "refuse_up")
    updating = _per_category(_source(_events(5, 50)).dataset())
    with pytest.raises(PlanError, match="PostgresSink takes appends only"):
        updating.start(sink=ms.postgres_sink(postgres.dsn, "refuse_up", mode="append"))
    with pytest.raises(PlanError, match=r"keyed by \['total'\], but the result's rows are "
                                        r"keyed by \['cat'\]"):
        updating.start(sink=ms.postgres_sink(postgres.dsn, "refuse_up", key="total"))
    with pytest.raises(PlanError, match="needs the key columns"):
        ms.postgres_sink(postgres.dsn, "refuse_up", mode="upsert")
    postgres.execute("DROP TABLE IF EXISTS refuse_nokey")
    postgres.execute("CREATE TABLE refuse_nokey (cat text, total bigint, n bigint)")
    job = updating.start(sink=ms.postgres_sink(postgres.dsn, "refuse_nokey", key="cat"),
                         executor="inline", checkpoint_interval=0)
    with pytest.raises(PlanError, match="needs a primary key or unique index"):
        job.await_termination(30)
    job = updating.start(sink=ms.postgres_sink(postgres.dsn, "no_such_table", key="cat"),
                         executor="inline", checkpoint_interval=0)
    with pytest.raises(PlanError, match="does not exist.*create_table=True"):
        job.await_termination(30)


def test_a_sink_survives_pickling_without_its_connection(postgres):
    import cloudpickle

    sink = PostgresSink(postgres.dsn, "pickled", key="id")
    sink._connection()
    copy = cloudpickle.loads(cloudpickle.dumps(sink))
    assert copy._conn is None and copy.run == sink.run
    sink.close()
