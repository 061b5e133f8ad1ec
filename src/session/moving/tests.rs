//! The move stage's protocol pieces in memory: the answer a lost block's
//! next statement gets, and the replay against a scripted server.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

fn message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn query(sql: &str) -> Vec<u8> {
    message(b'Q', format!("{sql}\0").as_bytes())
}

/// Runs [`answer_lost_block`] with `sent` from the client; returns what it
/// did, what the client got, and what stays held for the relay.
async fn lost_block_answer(sent: &[u8]) -> (LostBlockAnswer, Vec<u8>, Vec<u8>) {
    let (mut client, mut proxy) = tokio::io::duplex(64 * 1024);
    let mut held = ReadBuffer::new();
    // Sent in two pieces: the answer must wait for whole messages.
    let (a, b) = sent.split_at(sent.len() / 2);
    client.write_all(a).await.unwrap();
    let (answer, ()) = tokio::join!(answer_lost_block(&mut proxy, &mut held, 1 << 20), async {
        tokio::task::yield_now().await;
        client.write_all(b).await.unwrap();
    });
    drop(proxy);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    (answer.unwrap(), got, held.pending().to_vec())
}

fn sqlstate_of(got: &[u8]) -> Option<String> {
    messages::sqlstate(&got[5..]).map(|c| String::from_utf8_lossy(c).into_owned())
}

#[tokio::test]
async fn a_lost_blocks_next_statement_gets_40001_and_a_failed_status() {
    let mut sent = query("INSERT INTO t VALUES (2)");
    sent.extend(query("ROLLBACK"));
    let (answer, got, held) = lost_block_answer(&sent).await;
    assert_eq!(answer, LostBlockAnswer::Answered);
    assert_eq!(got[0], b'E');
    assert_eq!(sqlstate_of(&got).as_deref(), Some("40001"));
    assert!(got.ends_with(b"Z\0\0\0\x05E"), "ReadyForQuery E");
    assert_eq!(held, query("ROLLBACK"), "the ROLLBACK is relayed");
}

#[tokio::test]
async fn a_rollback_or_commit_goes_to_the_failed_block_as_is() {
    for sql in ["ROLLBACK", "  abort", "COMMIT", "end"] {
        let (answer, got, held) = lost_block_answer(&query(sql)).await;
        assert_eq!(answer, LostBlockAnswer::Relay, "{sql}");
        assert!(got.is_empty(), "{sql}");
        assert_eq!(held, query(sql));
    }
}

#[tokio::test]
async fn an_extended_batch_is_skipped_to_its_sync() {
    let mut sent = message(b'P', b"\0UPDATE t SET x = 1\0\0\0");
    sent.extend(message(b'B', b"\0\0\0\0\0\0\0\0"));
    sent.extend(message(b'E', b"\0\0\0\0\0"));
    sent.extend(message(b'S', b""));
    sent.extend(query("ROLLBACK"));
    let (answer, got, held) = lost_block_answer(&sent).await;
    assert_eq!(answer, LostBlockAnswer::Answered);
    assert_eq!(sqlstate_of(&got).as_deref(), Some("40001"));
    assert!(got.ends_with(b"Z\0\0\0\x05E"));
    assert_eq!(held, query("ROLLBACK"));
}

/// A server that answers `answers` messages as told: `Ok` or an error.
async fn scripted_server(
    mut server: DuplexStream,
    answers: Vec<Result<u8, &'static str>>,
) -> Vec<u8> {
    let mut got = BytesMut::new();
    let mut out = Vec::new();
    for a in answers {
        // Read one unit: a Query, or messages up to a Sync.
        loop {
            let (t, _) = read_message(&mut server, &mut got, 1 << 20)
                .await
                .unwrap()
                .unwrap();
            out.push(t);
            if t == b'Q' || t == b'S' {
                break;
            }
        }
        let mut reply = BytesMut::new();
        match a {
            Ok(_) => reply.extend_from_slice(&message(b'C', b"SET\0")),
            Err(code) => messages::put_error(&mut reply, Severity::Error, code, "no"),
        }
        let status = a.unwrap_or(b'I');
        reply.extend_from_slice(&message(b'Z', &[status]));
        server.write_all(&reply).await.unwrap();
    }
    out
}

#[tokio::test]
async fn the_replay_runs_every_item_and_a_lost_block_ends_failed() {
    let items = [
        Replay::Sql("SET search_path TO app".into()),
        Replay::Parse {
            name: "s1".into(),
            query: "select $1::int".into(),
            types: vec![23],
        },
    ];
    let (mut proxy, server) = tokio::io::duplex(64 * 1024);
    let script = vec![Ok(b'I'), Ok(b'I'), Ok(b'T'), Err("40001")];
    let (replayed, seen) = tokio::join!(
        replay(&mut proxy, &items, true),
        scripted_server(server, script)
    );
    assert_eq!(replayed, Ok(()));
    assert_eq!(
        seen,
        [b'Q', b'P', b'S', b'Q', b'Q'],
        "SET, Parse+Sync, BEGIN, the failing DO"
    );
}

#[tokio::test]
async fn a_replay_error_fails_the_move() {
    let items = [Replay::Sql("SET search_path TO app".into())];
    let (mut proxy, server) = tokio::io::duplex(64 * 1024);
    let (replayed, _) = tokio::join!(
        replay(&mut proxy, &items, false),
        scripted_server(server, vec![Err("42704")])
    );
    assert!(replayed.unwrap_err().contains("42704"));
}
