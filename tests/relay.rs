//! The relay: everything a client does on a direct connection works through
//! pgpivot. Real cluster, real clients (tokio-postgres, psql, pgbench).

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use pgpivot::localcluster::SUPERUSER;
use tokio_postgres::types::Type;
use tokio_postgres::AsyncMessage;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_reaches_the_primary_with_its_real_pid() {
    let proxy = proxy().await;
    let client = connect(proxy.addresses[0]).await;
    let rows = client
        .simple_query("select pg_is_in_recovery()::text, pg_backend_pid()::text")
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    assert_eq!(row.get(0), Some("false"));
    // The pid is the backend's own: it shows up in pg_stat_activity.
    let pid: i32 = row.get(1).unwrap().parse().unwrap();
    let found: i64 = client
        .query_one(
            "select count(*) from pg_stat_activity where pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_of_100_statements() {
    let proxy = proxy().await;
    let client = connect(proxy.addresses[0]).await;
    let stmt = client.prepare("select $1::int4 * 2").await.unwrap();
    let queries = (0..100).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move {
            client
                .query_one(stmt, &[&i])
                .await
                .map(|r| r.get::<_, i32>(0))
        }
    });
    let results = futures_util::future::join_all(queries).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), i as i32 * 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_binary_parameters() {
    let proxy = proxy().await;
    let client = connect(proxy.addresses[0]).await;
    let stmt = client
        .prepare_typed(
            "select $1::bytea, $2::float8, $3::int8[], $4::text",
            &[Type::BYTEA, Type::FLOAT8, Type::INT8_ARRAY, Type::TEXT],
        )
        .await
        .unwrap();
    let bytes: Vec<u8> = (0..=255).collect();
    let arr = vec![1i64, -2, i64::MAX];
    let row = client
        .query_one(
            &stmt,
            &[&bytes, &1.5f64, &arr, &"héllo\u{0}".replace('\u{0}', "")],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), bytes);
    assert_eq!(row.get::<_, f64>(1), 1.5);
    assert_eq!(row.get::<_, Vec<i64>>(2), arr);
    assert_eq!(row.get::<_, String>(3), "héllo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_in_a_pipeline_is_followed_by_a_working_query() {
    let proxy = proxy().await;
    let client = connect(proxy.addresses[0]).await;
    let (a, b, c) = tokio::join!(
        client.query_one("select 1", &[]),
        client.query_one("select 1/0", &[]),
        client.query_one("select 3", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(sqlstate(&b.unwrap_err()).as_deref(), Some("22012"));
    assert_eq!(c.unwrap().get::<_, i32>(0), 3);
    let after = client.query_one("select 4", &[]).await.unwrap();
    assert_eq!(after.get::<_, i32>(0), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_10_mb() {
    let proxy = proxy().await;
    let client = connect(proxy.addresses[0]).await;
    client
        .batch_execute("drop table if exists copy_t; create table copy_t (id int, payload text)")
        .await
        .unwrap();
    let line = |i: usize| format!("{i}\t{}\n", "x".repeat(100));
    let rows = 100_000;
    let sink = client.copy_in("copy copy_t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut sent = 0;
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1000) {
        let data: String = chunk.iter().map(|&i| line(i)).collect();
        sent += data.len();
        sink.send(bytes::Bytes::from(data)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), rows as u64);
    assert!(sent > 10_000_000);
    let out = client
        .copy_out("copy (select * from copy_t order by id) to stdout")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    assert_eq!(total, sent);
    let all: Vec<u8> = chunks.concat();
    assert!(all.starts_with(line(0).as_bytes()));
    assert!(all.ends_with(line(rows - 1).as_bytes()));
    // The session still works after COPY.
    assert_eq!(
        client
            .query_one("select 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_is_delivered_while_idle() {
    let proxy = proxy().await;
    let conn = conn_str(proxy.addresses[0], SUPERUSER, "");
    let (listener, mut connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(stream.for_each(move |m| {
        if let Ok(AsyncMessage::Notification(n)) = m {
            let _ = tx.send((
                n.channel().to_string(),
                n.payload().to_string(),
                n.process_id(),
            ));
        }
        async {}
    }));
    listener.batch_execute("listen pgpivot_test").await.unwrap();
    let notifier = connect(proxy.addresses[0]).await;
    let sender_pid: i32 = notifier
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    notifier
        .batch_execute("notify pgpivot_test, 'hello'")
        .await
        .unwrap();
    // The listener sends nothing: the notification must arrive on its own.
    let (channel, payload, pid) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notification within 10 s")
        .unwrap();
    assert_eq!(
        (channel.as_str(), payload.as_str()),
        ("pgpivot_test", "hello")
    );
    assert_eq!(pid, sender_pid, "the sender pid is the real backend pid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_bytea_round_trips() {
    let proxy = proxy().await;
    let client = connect(proxy.addresses[0]).await;
    let big: Vec<u8> = (0..100 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let row = client
        .query_one("select $1::bytea, length($1::bytea)", &[&big])
        .await
        .unwrap();
    let back: Vec<u8> = row.get(0);
    assert_eq!(row.get::<_, i32>(1) as usize, big.len());
    assert!(back == big, "bytea came back different");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_backend_within_a_second() {
    let proxy = proxy().await;
    let client = connect(proxy.addresses[0]).await;
    let node = shared_cluster().node(0).conn_string();
    let (slept, took) = cancel_a_sleep(&client, &node).await;
    let err = slept.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(took < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_with_an_unknown_key_is_ignored() {
    let proxy = proxy().await;
    let client = connect(proxy.addresses[0]).await;
    // A raw CancelRequest with a made-up key: no answer, nothing cancelled.
    let mut raw = tokio::net::TcpStream::connect(proxy.addresses[0])
        .await
        .unwrap();
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend_from_slice(&[0, 0, 0, 1, 9, 9, 9, 9]);
    tokio::io::AsyncWriteExt::write_all(&mut raw, &packet)
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::io::AsyncReadExt::read(&mut raw, &mut buf)
        .await
        .unwrap();
    assert_eq!(n, 0, "a cancel request gets no reply");
    let r = client.query_one("select pg_sleep(0.2)::text", &[]).await;
    assert!(r.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_termination_is_delivered_as_the_server_sent_it() {
    let proxy = proxy().await;
    let victim = connect(proxy.addresses[0]).await;
    let pid: i32 = victim
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let killer = connect(proxy.addresses[0]).await;
    killer
        .query_one("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = victim.query_one("select 1", &[]).await.unwrap_err();
    // The server's own FATAL 57P01 reaches the client (or the closed
    // connection, if it arrived before our query): never a made-up error.
    if let Some(code) = sqlstate(&err) {
        assert_eq!(code, "57P01", "{err}");
    } else {
        assert!(err.is_closed(), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_commands_and_copy_script() {
    let cluster = shared_cluster();
    let proxy = proxy().await;
    let conn = conn_str(proxy.addresses[0], SUPERUSER, "");
    let out = run_tool(
        cluster,
        "psql",
        &["-XAtq", "-d", &conn, "-c", "select 40 + 2"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("in.csv");
    std::fs::write(
        &data,
        (1..=1000)
            .map(|i| format!("{i},row{i}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out_file = dir.path().join("out.csv");
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            "drop table if exists psql_copy;\ncreate table psql_copy (id int, name text);\n\\copy psql_copy from '{}' csv\n\\copy (select * from psql_copy order by id) to '{}' csv\nselect count(*), sum(id) from psql_copy;\n",
            data.display(),
            out_file.display()
        ),
    )
    .unwrap();
    let out = run_tool(
        cluster,
        "psql",
        &[
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conn,
            "-f",
            script.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1000|500500"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(&out_file).unwrap(),
        std::fs::read(&data).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_in_every_query_mode_without_failures() {
    let cluster = shared_cluster();
    let proxy = proxy().await;
    let addr = proxy.addresses[0];
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let base = ["-h", &host, "-p", &port, "-U", SUPERUSER];
    let mut init = base.to_vec();
    init.extend(["-i", "-q", "-s", "1", "postgres"]);
    let out = run_tool(cluster, "pgbench", &init).await;
    assert!(out.status.success(), "{}", text(&out));
    for mode in ["simple", "extended", "prepared"] {
        let mut args = base.to_vec();
        args.extend(["-M", mode, "-c", "4", "-j", "2", "-t", "200", "postgres"]);
        let out = run_tool(cluster, "pgbench", &args).await;
        let report = text(&out);
        assert!(out.status.success(), "{report}");
        assert!(
            report.contains("number of failed transactions: 0"),
            "{report}"
        );
        assert!(
            report.contains("number of transactions actually processed: 800/800"),
            "{report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_through_psql_use_function_calls() {
    // psql's \lo_import and \lo_export go through libpq's fast-path
    // FunctionCall ('F') messages: a real client of that protocol corner.
    let cluster = shared_cluster();
    let proxy = proxy().await;
    let conn = conn_str(proxy.addresses[0], SUPERUSER, "");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("blob.bin");
    let output = dir.path().join("blob.out");
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&input, &blob).unwrap();
    let script = format!(
        "\\lo_import '{}'\n\\lo_export :LASTOID '{}'\n\\lo_unlink :LASTOID\n",
        input.display(),
        output.display()
    );
    let script_path = dir.path().join("lo.sql");
    std::fs::write(&script_path, script).unwrap();
    let out = run_tool(
        cluster,
        "psql",
        &[
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conn,
            "-f",
            script_path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::read(&output).unwrap() == blob,
        "the large object came back different"
    );
}
