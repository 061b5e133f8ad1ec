//! The tracker fed message by message as a server would answer.

use super::*;

/// Runs `sql` as one simple Query that succeeds, statement tags `tags`, and
/// ends with ReadyForQuery `status`.
fn ok(t: &mut Tracker, sql: &str, tags: &[&str], status: TxStatus) {
    t.client_query(sql.as_bytes());
    for tag in tags {
        t.server_command_complete(tag);
    }
    t.server_ready(status);
}

fn sql_replay(t: &Tracker) -> Vec<String> {
    t.replay()
        .into_iter()
        .map(|r| match r {
            Replay::Sql(s) => s,
            Replay::Parse { name, .. } => format!("<parse {name}>"),
        })
        .collect()
}

use TxStatus::{Idle, InTransaction};

#[test]
fn session_settings_are_replayed_in_order_and_reset_all_clears_them() {
    let mut t = Tracker::default();
    ok(&mut t, "SET search_path TO app, public", &["SET"], Idle);
    ok(
        &mut t,
        "set application_name = 'x;y'; SET LOCAL work_mem = '1MB'",
        &["SET", "SET"],
        Idle,
    );
    ok(&mut t, "RESET search_path", &["RESET"], Idle);
    assert_eq!(
        sql_replay(&t),
        [
            "SET search_path TO app, public",
            "set application_name = 'x;y'",
            "RESET search_path"
        ]
    );
    ok(&mut t, "RESET ALL", &["RESET"], Idle);
    assert!(sql_replay(&t).is_empty());
    assert_eq!(t.pinned(), None);
}

#[test]
fn changes_in_a_block_count_only_once_it_commits() {
    let mut t = Tracker::default();
    ok(&mut t, "BEGIN", &["BEGIN"], InTransaction);
    ok(&mut t, "SET timezone = 'UTC'", &["SET"], InTransaction);
    ok(&mut t, "ROLLBACK", &["ROLLBACK"], Idle);
    assert!(sql_replay(&t).is_empty(), "rolled back");
    ok(
        &mut t,
        "BEGIN; SET timezone = 'UTC'; COMMIT",
        &["BEGIN", "SET", "COMMIT"],
        Idle,
    );
    assert_eq!(sql_replay(&t), ["SET timezone = 'UTC'"]);
    // A failed block: its COMMIT answers ROLLBACK.
    ok(&mut t, "BEGIN", &["BEGIN"], InTransaction);
    ok(&mut t, "SET datestyle = 'ISO'", &["SET"], InTransaction);
    t.client_query(b"select 1/0");
    t.server_error();
    t.server_ready(TxStatus::Failed);
    ok(&mut t, "COMMIT", &["ROLLBACK"], Idle);
    assert_eq!(sql_replay(&t), ["SET timezone = 'UTC'"]);
}

#[test]
fn a_failed_statement_and_the_rest_of_its_query_change_nothing() {
    let mut t = Tracker::default();
    t.client_query(b"SET search_path = a; SET nonsense.x = 1 2; LISTEN ch");
    t.server_command_complete("SET");
    t.server_error();
    t.server_ready(Idle);
    assert_eq!(sql_replay(&t), ["SET search_path = a"]);
}

#[test]
fn prepared_statements_and_listens_follow_their_commands() {
    let mut t = Tracker::default();
    ok(&mut t, "PREPARE q1 AS select $1::int", &["PREPARE"], Idle);
    t.client_parse("s1", b"select 1", &[23]);
    t.client_parse("", b"select 2", &[]);
    ok(
        &mut t,
        "LISTEN jobs; LISTEN \"Other\"",
        &["LISTEN", "LISTEN"],
        Idle,
    );
    assert_eq!(
        sql_replay(&t),
        [
            "PREPARE q1 AS select $1::int",
            "<parse s1>",
            "LISTEN \"Other\"",
            "LISTEN jobs"
        ]
    );
    ok(
        &mut t,
        "DEALLOCATE q1; UNLISTEN jobs",
        &["DEALLOCATE", "UNLISTEN"],
        Idle,
    );
    t.client_close_statement("s1");
    assert_eq!(sql_replay(&t), ["LISTEN \"Other\""]);
    ok(&mut t, "DISCARD ALL", &["DISCARD ALL"], Idle);
    assert!(sql_replay(&t).is_empty());
}

#[test]
fn state_that_cannot_move_pins_the_session() {
    let cases = [
        ("create temp table t (x int)", Pin::TempObject),
        (
            "CREATE GLOBAL TEMPORARY VIEW v AS select 1",
            Pin::TempObject,
        ),
        ("select * into temp t from x", Pin::TempObject),
        ("declare c cursor with hold for select 1", Pin::HoldCursor),
        ("select pg_advisory_lock(1)", Pin::AdvisoryLock),
        (
            "select set_config('search_path', 'x', false)",
            Pin::SetConfig,
        ),
        ("LOAD 'auto_explain'", Pin::Load),
        (
            "DO $$BEGIN PERFORM set_config('search_path', 'x', false); END$$",
            Pin::Unparsed,
        ),
        ("select pg_try_advisory_lock(1)", Pin::AdvisoryLock),
        ("set search_path = 'unterminated", Pin::Unparsed),
    ];
    for (sql, pin) in cases {
        let mut t = Tracker::default();
        ok(&mut t, sql, &["SELECT 1"], Idle);
        assert_eq!(t.pinned(), Some(pin), "{sql}");
    }
    // A temp table that DISCARD TEMP dropped no longer pins.
    let mut t = Tracker::default();
    ok(
        &mut t,
        "create temp table t (x int)",
        &["CREATE TABLE"],
        Idle,
    );
    ok(&mut t, "discard temp", &["DISCARD TEMP"], Idle);
    assert_eq!(t.pinned(), None);
    // A pinning statement that was rolled back leaves no pin.
    let mut t = Tracker::default();
    ok(
        &mut t,
        "BEGIN; create temp table t (x int); ROLLBACK",
        &["BEGIN", "CREATE TABLE", "ROLLBACK"],
        Idle,
    );
    assert_eq!(t.pinned(), None);
}

#[test]
fn a_rollback_to_savepoint_over_tracked_changes_pins() {
    let mut t = Tracker::default();
    ok(
        &mut t,
        "BEGIN; SAVEPOINT a",
        &["BEGIN", "SAVEPOINT"],
        InTransaction,
    );
    ok(
        &mut t,
        "ROLLBACK TO SAVEPOINT a",
        &["ROLLBACK"],
        InTransaction,
    );
    ok(&mut t, "COMMIT", &["COMMIT"], Idle);
    assert_eq!(t.pinned(), None, "nothing tracked was undone");
    ok(
        &mut t,
        "BEGIN; SET x.y = 1; SAVEPOINT a",
        &["BEGIN", "SET", "SAVEPOINT"],
        InTransaction,
    );
    ok(&mut t, "ROLLBACK TO a", &["ROLLBACK"], InTransaction);
    assert_eq!(t.pinned(), Some(Pin::Unparsed));
}

#[test]
fn a_parse_that_changes_state_pins_and_state_is_bounded() {
    let mut t = Tracker::default();
    t.client_parse("", b"SET search_path = x", &[]);
    assert_eq!(t.pinned(), Some(Pin::Unparsed));
    let mut t = Tracker::default();
    let big = format!("select '{}'", "x".repeat(MAX_STATE_BYTES / 4));
    for i in 0..5 {
        t.client_parse(&format!("s{i}"), big.as_bytes(), &[]);
    }
    assert_eq!(t.pinned(), Some(Pin::TooMuchState));
    assert!(t.state_bytes() > MAX_STATE_BYTES);
}

#[test]
fn a_statement_text_that_is_not_utf8_pins_as_unread() {
    // Asked twice each: the second time, the text is one seen lately.
    for _ in 0..2 {
        let mut t = Tracker::default();
        t.client_query(b"select '\xff'");
        assert_eq!(t.pinned(), Some(Pin::Unparsed));
        let mut t = Tracker::default();
        t.client_parse("", b"select '\xfe'", &[]);
        assert_eq!(t.pinned(), Some(Pin::Unparsed));
        // Valid texts beside them still pin nothing.
        let mut t = Tracker::default();
        t.client_query(b"select 'x'");
        t.client_parse("", b"select 'y'", &[]);
        assert_eq!(t.pinned(), None);
    }
}

#[test]
fn pipelined_queries_are_matched_to_their_own_answers() {
    let mut t = Tracker::default();
    t.client_query(b"SET a.x = 1");
    t.client_sync(); // an extended-protocol batch between them
    t.client_query(b"SET b.x = 2; SET c.x = 3");
    t.server_command_complete("SET");
    t.server_ready(Idle);
    t.server_command_complete("SELECT 1"); // the batch's Execute
    t.server_ready(Idle);
    t.server_command_complete("SET");
    t.server_error(); // SET c.x failed
    t.server_ready(Idle);
    assert_eq!(sql_replay(&t), ["SET a.x = 1", "SET b.x = 2"]);
}

#[test]
fn only_text_with_a_state_word_is_lexed() {
    for plain in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "select 'unterminated",
        "UPDATE t SET x = 1", // lexed (SET), and changes nothing
    ] {
        let mut t = Tracker::default();
        ok(&mut t, plain, &["X"], Idle);
        assert_eq!(t.pinned(), None, "{plain}");
        assert!(t.replay().is_empty(), "{plain}");
    }
    assert!(!might_change_state(
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    ));
    for word in [
        "SeT x=1",
        "select PG_ADVISORY_LOCK(1)",
        "create TEMP table t()",
        "unlisten *",
    ] {
        assert!(might_change_state(word), "{word}");
    }
}

#[test]
fn a_commit_in_flight_is_known() {
    let mut t = Tracker::default();
    t.client_query(b"UPDATE t SET x = 1");
    assert!(!t.commit_in_flight());
    t.client_query(b"COMMIT");
    assert!(t.commit_in_flight());
    t.lose_backend();
    assert!(!t.commit_in_flight());
    // Extended protocol: an unnamed Parse before its Sync, and any Sync once
    // a named statement may commit.
    t.client_parse("", b"END", &[]);
    t.client_sync();
    assert!(t.commit_in_flight());
    t.server_ready(Idle);
    t.client_sync();
    assert!(!t.commit_in_flight());
    t.server_ready(Idle);
    t.client_parse("c", b"commit", &[]);
    t.client_sync();
    t.server_ready(Idle);
    t.client_sync();
    assert!(t.commit_in_flight());
}

/// The scan as first written, one byte at a time, finding where each run
/// starts: the fast [`scan_words`] must find exactly what it finds (both
/// compare a run's start with the words by [`look_for_words`]).
fn scan_words_bytewise(sql: &str) -> Words {
    let text = sql.as_bytes();
    let mut words = Words::default();
    let mut in_run = false;
    for (i, &b) in text.iter().enumerate() {
        let alnum = b.is_ascii_alphanumeric();
        if alnum && !in_run {
            look_for_words(&text[i..], &mut words);
        }
        in_run = alnum;
    }
    words
}

#[test]
fn the_fast_word_scan_finds_what_the_bytewise_one_does() {
    // Pieces that start, end, split and hide words; strings of them are
    // drawn by a fixed xorshift so every run checks the same 20,000.
    let pieces = [
        "set",
        "SeT",
        "reset",
        "rollback",
        "prepare",
        "deallocate",
        "discard",
        "do",
        "DO ",
        "done",
        "listen",
        "load",
        "unlisten",
        "hold",
        "temp",
        "advisory",
        "commit",
        "end",
        "END",
        "select",
        "x",
        "1",
        "9a",
        " ",
        "_",
        "$",
        "$1",
        ";",
        "'",
        "\"",
        "(",
        "é",
        "ü",
        "\t",
        "\n",
        "--",
        "/*",
        "pg_",
        "s",
        "e",
        "d",
        "c",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let len = (next() % 12) as usize;
        let sql: String = (0..len)
            .map(|_| pieces[(next() % pieces.len() as u64) as usize])
            .collect();
        assert_eq!(scan_words(&sql), scan_words_bytewise(&sql), "{sql:?}");
    }
    assert_eq!(scan_words(""), Words::default());
}
