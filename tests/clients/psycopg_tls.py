"""What libpq >= 17 clients do over TLS, with psycopg 3, against a conninfo.

  psycopg_tls.py wide CONNINFO ROUNDS   the stall pattern: a wide table of mixed
      types filled by a pipelined executemany, read back with COPY TO STDOUT
      (text and binary) and SELECT, written again with COPY FROM STDIN
  psycopg_tls.py slow CONNINFO MB       COPY TO STDOUT of MB megabytes read
      slowly, then the same read fast; checks every byte
  psycopg_tls.py copyin CONNINFO MB     COPY FROM STDIN of MB megabytes in odd
      chunk sizes; checks the row count and sum on the server
  psycopg_tls.py cancel CONNINFO ROUNDS cancel_safe() (PQcancelConn, encrypted
      when the session is) of a running pg_sleep

Every round has a deadline, so a stall is reported instead of hanging the
caller. Prints one line per round, then "N passed, N failed".
"""
import hashlib
import os
import sys
import threading
import time

import psycopg

SCALE = float(os.environ.get("SCALE", "1"))

COLUMNS = [
    ("b", "bytea"), ("n", "numeric"), ("ia", "int[]"), ("r", "int4range"),
    ("j", "jsonb"), ("t", "text"), ("ts", "timestamptz"), ("f", "float8"),
    ("u", "uuid"), ("ta", "text[]"), ("i8", "int8"), ("bo", "bool"),
    ("d", "date"), ("iv", "interval"), ("js", "json"), ("c", "char(7)"),
    ("vc", "varchar(300)"), ("nr", "numrange"), ("tt", "text"), ("bb", "bytea"),
]


def row(i):
    return scaled(i, (
        bytes((i * 7 + k) % 256 for k in range(300 + 37 * i)),
        f"{i}.{'9' * (i % 17)}",
        list(range(i * 3)),
        f"[{i},{i + 10})",
        '{"k": %d, "v": "%s"}' % (i, "é" * (i * 11)),
        "ünïcødé ✓ " * (50 + i * 13),
        "2026-12-01 11:00:00+00",
        i / 7.0,
        f"00000000-0000-0000-0000-{i:012d}",
        [f"s{i}-{k}" for k in range(i)],
        i * 1_000_003,
        i % 2 == 0,
        "2026-01-01",
        f"{i} hours",
        '[%d, "x"]' % i,
        "abc",
        "v" * (i * 13 % 300),
        f"[{i}.5,{i + 1}.25]",
        "ż" * (777 * i % 4000),
        bytes(range(256)) * (i % 9),
    ))


def scaled(i, values):
    """Cuts the long values to SCALE of their length (odd sizes on purpose)."""
    out = []
    for v in values:
        if isinstance(v, bytes) or (isinstance(v, str) and v[:1] not in "{["):
            v = v[: max(1, int(len(v) * SCALE))] if len(v) > 40 else v
        out.append(v)
    return tuple(out)


def one_round(conn, k):
    with conn.cursor() as cur:
        table = f"stall_{k}"
        cur.execute(f"drop table if exists {table}")
        cols = ", ".join(f"{n} {t}" for n, t in COLUMNS)
        cur.execute(f"create table {table} (id int primary key, {cols})")
        marks = ", ".join(["%s"] * (len(COLUMNS) + 1))
        cur.executemany(
            f"insert into {table} values ({marks})",
            [(i,) + row(i) for i in range(20)],
        )
        got = 0
        for fmt in ("text", "binary"):
            query = f"copy (select * from {table} order by id) to stdout (format {fmt})"
            with cur.copy(query) as copy:
                for block in copy:
                    got += len(block)
        cur.execute(f"select * from {table} order by id")
        assert len(cur.fetchall()) == 20
        with cur.copy(f"copy {table} to stdout") as copy:
            data = b"".join(bytes(b) for b in copy)
        cur.execute(f"truncate {table}")
        with cur.copy(f"copy {table} from stdin") as copy:
            for off in range(0, len(data), 5_000):
                copy.write(data[off:off + 5_000])
        cur.execute(f"select count(*) from {table}")
        assert cur.fetchone()[0] == 20
        cur.execute(f"drop table {table}")
    conn.commit()
    return got


def slow(conn, k, mb):
    """COPY out with pauses between reads, then without; compares both."""
    rows = mb * 1024 * 1024 // 1100
    query = (
        "copy (select g, repeat(md5(g::text), 1 + mod(g * 7, 61)) "
        f"from generate_series(1, {rows + k}) g) to stdout"
    )
    digests = []
    for pause in (0.0005, 0):
        h, n = hashlib.sha256(), 0
        with conn.cursor() as cur, cur.copy(query) as copy:
            for i, block in enumerate(copy):
                h.update(block)
                n += len(block)
                if pause and i % 64 == 0:
                    time.sleep(pause)
        digests.append((n, h.hexdigest()))
    assert digests[0] == digests[1], digests
    return digests[0][0]


def copyin(conn, k, mb):
    """COPY in of `mb` megabytes sent in uneven chunks."""
    line = b"x" * 1000
    total = mb * 1024 * 1024
    with conn.cursor() as cur:
        cur.execute("create temp table sink (id int, v text)")
        sent, rows, chunk = 0, 0, bytearray()
        with cur.copy("copy sink from stdin") as copy:
            while sent < total:
                rows += 1
                chunk += b"%d\t%s\n" % (rows, line[: 1 + (rows * 37) % 1000])
                if len(chunk) > 7_001 + (rows % 5) * 13_337:
                    copy.write(bytes(chunk))
                    sent += len(chunk)
                    chunk.clear()
            copy.write(bytes(chunk))
        cur.execute("select count(*), sum(id) from sink")
        count, total_ids = cur.fetchone()
        assert count == rows and total_ids == rows * (rows + 1) // 2, (count, rows)
        cur.execute("drop table sink")
    conn.commit()
    return sent


def cancel(conn, k):
    """Cancels a running query with cancel_safe(), which uses PQcancelConn."""
    errors = []

    def canceller():
        time.sleep(0.3)
        try:
            conn.cancel_safe(timeout=10)
        except Exception as e:
            errors.append(repr(e))

    t = threading.Thread(target=canceller)
    t.start()
    started = time.monotonic()
    try:
        conn.execute("select pg_sleep(30)")
        raise AssertionError("pg_sleep was not cancelled")
    except psycopg.errors.QueryCanceled:
        pass
    t.join()
    assert not errors, f"cancel_safe failed: {errors}"
    conn.rollback()
    return time.monotonic() - started


def main():
    mode, conninfo, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rounds, work = {
        "wide": (n, lambda conn, k: one_round(conn, k)),
        "slow": (3, lambda conn, k: slow(conn, k, n)),
        "copyin": (1, lambda conn, k: copyin(conn, k, n)),
        "cancel": (n, cancel),
    }[mode]
    deadline = 120 if mode in ("slow", "copyin") else 20
    passed = failed = 0
    for k in range(rounds):
        result = {}

        def run():
            try:
                with psycopg.connect(conninfo) as conn:
                    result["value"] = work(conn, k)
            except Exception as e:  # reported, not raised: the caller counts
                result["error"] = repr(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(deadline)
        if t.is_alive():
            failed += 1
            print(f"round {k}: STALLED (no answer within {deadline} s)", flush=True)
        elif "error" in result:
            failed += 1
            print(f"round {k}: error {result['error']}", flush=True)
        else:
            passed += 1
            print(f"round {k}: ok, {result['value']}", flush=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()
