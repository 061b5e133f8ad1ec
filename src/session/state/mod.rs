//! The session state a move to another backend must carry, and what pins a
//! session to its backend. The relay feeds the [`Tracker`]; the move stage
//! replays what it kept.
//!
//! Fed the few messages that define state (client Query, Parse, Close; server
//! CommandComplete, ErrorResponse, ReadyForQuery), it keeps:
//! - session-level `SET` / `RESET` / `RESET ALL` and `SET SESSION
//!   CHARACTERISTICS`, replayed in order (`SET LOCAL` never outlives its
//!   transaction, so it is not kept);
//! - prepared statements: SQL `PREPARE` and named protocol-level Parse, with
//!   `DEALLOCATE [ALL]`, Close and `DISCARD ALL`;
//! - `LISTEN` / `UNLISTEN` channels.
//!
//! Changes made inside a transaction block count only once it commits
//! (the server's CommandComplete says `COMMIT`, not `ROLLBACK`); a failed
//! statement changes nothing. State that cannot move pins the session:
//! temporary objects, `WITH HOLD` cursors, session advisory locks,
//! `set_config(…)`, `LOAD`, and anything the lexer cannot read with
//! certainty. The amount kept is bounded: past [`MAX_STATE_BYTES`] the
//! session is pinned too.
//!
//! The hot path stays cheap: a statement is lexed only when its text holds
//! one of the words that state changes need ([`scan_words`]); the
//! common `SELECT …` is one byte scan and no allocation, and a text this
//! thread saw lately is not scanned again (`recent`).

mod awaiting;
mod recent;
pub mod sql;

use std::collections::{BTreeSet, VecDeque};

use crate::protocol::messages::TxStatus;
use awaiting::Awaiting;
use recent::scan_words_recent;
use sql::Token;

/// Most bytes of SQL text and names one session may have tracked.
pub const MAX_STATE_BYTES: usize = 256 * 1024;

/// Why a session cannot move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pin {
    TempObject,
    HoldCursor,
    AdvisoryLock,
    SetConfig,
    Load,
    /// Text the tracker could not read with certainty.
    Unparsed,
    /// More state than [`MAX_STATE_BYTES`].
    TooMuchState,
}

impl Pin {
    pub fn as_label(self) -> &'static str {
        match self {
            Pin::TempObject => "temp_object",
            Pin::HoldCursor => "hold_cursor",
            Pin::AdvisoryLock => "advisory_lock",
            Pin::SetConfig => "set_config",
            Pin::Load => "load",
            Pin::Unparsed => "unparsed",
            Pin::TooMuchState => "too_much_state",
        }
    }
}

/// One thing to redo on a new backend, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// A statement to run as is (`SET …`, `RESET …`, `PREPARE …`, `LISTEN …`).
    Sql(String),
    /// A protocol-level Parse to send again: name, query, parameter type OIDs.
    Parse {
        name: String,
        query: String,
        types: Vec<u32>,
    },
}

/// A change one statement would make, applied when it is known to stick.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Guc(String),
    ResetAll,
    Prepare {
        name: String,
        sql: String,
    },
    Deallocate(Option<String>),
    Listen(String),
    Unlisten(Option<String>),
    DiscardAll,
    DiscardTemp,
    /// `ROLLBACK TO SAVEPOINT`: undoes part of a block, which the tracker
    /// does not follow.
    RollbackTo,
    Pin(Pin),
    /// Statements that change nothing tracked still take a CommandComplete.
    Nothing,
}

/// One message a ReadyForQuery will close: the changes its statements would
/// make (one per statement), and whether it may end a transaction block
/// with a commit (what a crash in flight must not answer with 40001).
#[derive(Debug, Default)]
struct Unit {
    changes: VecDeque<Change>,
    may_commit: bool,
}

/// The tracked state of one session.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Session SET/RESET statements in order (a RESET ALL clears them).
    gucs: Vec<String>,
    /// Prepared statements by name, in creation order.
    prepared: Vec<(String, Replay)>,
    listens: BTreeSet<String>,
    pins: BTreeSet<Pin>,
    /// Per message that a ReadyForQuery will close (Query, Sync,
    /// FunctionCall), in the order sent. Clients pipeline, so several may
    /// wait.
    awaiting: Awaiting<Unit>,
    /// The unnamed Parse messages since the last Sync may commit.
    parsed_commit: bool,
    /// Some named prepared statement may commit (so may any Sync unit that
    /// executes it).
    named_commit: bool,
    /// Changes of the open transaction block, applied at its COMMIT.
    in_block: Vec<Change>,
    /// A transaction block is open (BEGIN seen, or the server said so).
    block_open: bool,
    /// What is kept changed since [`Tracker::take_changed`] last looked.
    changed: bool,
}

impl Tracker {
    /// A client simple Query, its text as sent (a text that is not UTF-8 is
    /// taken as unread).
    pub fn client_query(&mut self, sql: &[u8]) {
        let Some(words) = scan_words_recent(sql) else {
            return self.client_query_unread();
        };
        let may_commit = words.commit;
        if !words.state {
            self.awaiting.push_back(Unit {
                changes: VecDeque::new(),
                may_commit,
            });
            return;
        }
        // The scan found it UTF-8; only a text that may change state is
        // taken apart, and needs it as a string.
        let Some(statements) = std::str::from_utf8(sql).ok().and_then(sql::statements) else {
            self.pins.insert(Pin::Unparsed);
            self.awaiting.push_back(Unit {
                changes: VecDeque::new(),
                may_commit: true,
            });
            return;
        };
        let changes = statements
            .iter()
            .map(|(text, tokens)| classify(text, tokens))
            .collect();
        self.awaiting.push_back(Unit {
            changes,
            may_commit,
        });
    }

    /// A client Query too large to read (passed through unread): whatever it
    /// did cannot be known.
    pub fn client_query_unread(&mut self) {
        self.pins.insert(Pin::Unparsed);
        self.awaiting.push_back(Unit {
            changes: VecDeque::new(),
            may_commit: true,
        });
    }

    /// A client Sync or FunctionCall: answered by a ReadyForQuery, and
    /// changing nothing the tracker follows.
    pub fn client_sync(&mut self) {
        let may_commit = std::mem::take(&mut self.parsed_commit) || self.named_commit;
        self.awaiting.push_back(Unit {
            changes: VecDeque::new(),
            may_commit,
        });
    }

    /// A client Parse. Named statements are kept for replay; a statement
    /// that itself changes session state pins (the extended protocol is not
    /// followed statement by statement).
    pub fn client_parse(&mut self, name: &str, query: &[u8], types: &[u32]) {
        let Some(words) = scan_words_recent(query) else {
            return self.client_parse_unread();
        };
        if words.commit {
            if name.is_empty() {
                self.parsed_commit = true;
            } else {
                self.named_commit = true;
            }
        }
        if !words.state && name.is_empty() {
            // The common case (an unnamed statement that changes nothing
            // followed): no string needed.
            return;
        }
        // The scan found it UTF-8; what follows takes it apart or keeps it.
        let Ok(query) = std::str::from_utf8(query) else {
            return self.client_parse_unread();
        };
        if words.state {
            match sql::statements(query) {
                Some(statements) => {
                    for (text, tokens) in &statements {
                        if classify(text, tokens) != Change::Nothing {
                            self.pins.insert(Pin::Unparsed);
                        }
                    }
                }
                None => {
                    self.pins.insert(Pin::Unparsed);
                }
            }
        }
        if !name.is_empty() {
            let replay = Replay::Parse {
                name: name.to_string(),
                query: query.to_string(),
                types: types.to_vec(),
            };
            self.remember_prepared(name.to_string(), replay);
        }
    }

    /// A client Parse too large to read: pins, and may commit.
    pub fn client_parse_unread(&mut self) {
        self.pins.insert(Pin::Unparsed);
        self.named_commit = true;
    }

    /// A client Close of a prepared statement (`'S'`) named `name`.
    pub fn client_close_statement(&mut self, name: &str) {
        self.prepared.retain(|(n, _)| n != name);
        self.changed = true;
    }

    /// Whether what is kept changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// A CommandComplete: the oldest awaited statement succeeded.
    pub fn server_command_complete(&mut self, tag: &str) {
        let change = self
            .awaiting
            .front_mut()
            .and_then(|unit| unit.changes.pop_front())
            .unwrap_or(Change::Nothing);
        match (tag, change) {
            // Uncertainty pins at once, block or not.
            (_, Change::Pin(Pin::Unparsed)) => self.apply(Change::Pin(Pin::Unparsed)),
            // The tag of ROLLBACK TO SAVEPOINT is ROLLBACK too; the block
            // stays open, and any change tracked in it is now uncertain.
            (_, Change::RollbackTo) => {
                if self.in_block.iter().any(|c| *c != Change::Nothing) {
                    self.apply(Change::Pin(Pin::Unparsed));
                }
            }
            ("BEGIN" | "START TRANSACTION", _) => self.block_open = true,
            ("COMMIT", _) => {
                self.block_open = false;
                for c in std::mem::take(&mut self.in_block) {
                    self.apply(c);
                }
            }
            // Also what a COMMIT of a failed block answers.
            ("ROLLBACK", _) => {
                self.block_open = false;
                self.in_block.clear();
            }
            (_, change) if self.block_open => self.in_block.push(change),
            (_, change) => self.apply(change),
        }
    }

    /// An ErrorResponse: the statement that failed changes nothing, and the
    /// rest of its simple Query is not run.
    pub fn server_error(&mut self) {
        if let Some(current) = self.awaiting.front_mut() {
            current.changes.clear();
        }
    }

    /// A ReadyForQuery with `status`: the oldest Query (or Sync) is answered.
    pub fn server_ready(&mut self, status: TxStatus) {
        self.awaiting.pop_front();
        if status == TxStatus::Idle {
            // A block that ended without COMMIT (ROLLBACK, or a failed one)
            // left nothing behind.
            self.in_block.clear();
        }
        self.block_open = status != TxStatus::Idle;
    }

    /// Whether a message awaiting its answer may have committed a
    /// transaction block (a crash then leaves its outcome unknown).
    pub fn commit_in_flight(&self) -> bool {
        self.awaiting.iter().any(|unit| unit.may_commit)
    }

    /// The backend died: answers for what was in flight will never come,
    /// and the open block's changes are lost with it.
    pub fn lose_backend(&mut self) {
        self.awaiting.clear();
        self.in_block.clear();
    }

    /// Whether the session LISTENs on any channel (a move may lose the
    /// notifications sent while it is between nodes).
    pub fn listens(&self) -> bool {
        !self.listens.is_empty()
    }

    /// Why the session cannot move, if it cannot (the first reason).
    pub fn pinned(&self) -> Option<Pin> {
        self.pins.iter().next().copied()
    }

    /// What to redo on a new backend, in order.
    pub fn replay(&self) -> Vec<Replay> {
        let mut out: Vec<Replay> = self.gucs.iter().cloned().map(Replay::Sql).collect();
        out.extend(self.prepared.iter().map(|(_, r)| r.clone()));
        out.extend(
            self.listens
                .iter()
                .map(|ch| Replay::Sql(format!("LISTEN {ch}"))),
        );
        out
    }

    /// Bytes of text kept (names and SQL), for the bound and the metrics.
    pub fn state_bytes(&self) -> usize {
        let gucs: usize = self.gucs.iter().map(String::len).sum();
        let prepared: usize = self
            .prepared
            .iter()
            .map(|(n, r)| {
                n.len()
                    + match r {
                        Replay::Sql(s) => s.len(),
                        Replay::Parse { query, types, .. } => query.len() + 4 * types.len(),
                    }
            })
            .sum();
        gucs + prepared + self.listens.iter().map(String::len).sum::<usize>()
    }

    fn apply(&mut self, change: Change) {
        self.changed |= !matches!(change, Change::Nothing | Change::RollbackTo);
        match change {
            Change::Guc(statement) => {
                self.gucs.push(statement);
                self.check_size();
            }
            Change::ResetAll => self.gucs.clear(),
            Change::Prepare { name, sql } => self.remember_prepared(name, Replay::Sql(sql)),
            Change::Deallocate(None) => self.prepared.clear(),
            Change::Deallocate(Some(name)) => self.client_close_statement(&name),
            Change::Listen(channel) => {
                self.listens.insert(channel);
                self.check_size();
            }
            Change::Unlisten(None) => self.listens.clear(),
            Change::Unlisten(Some(channel)) => {
                self.listens.remove(&channel);
            }
            Change::DiscardAll => {
                self.gucs.clear();
                self.prepared.clear();
                self.listens.clear();
                self.pins.remove(&Pin::TempObject);
            }
            Change::DiscardTemp => {
                self.pins.remove(&Pin::TempObject);
            }
            Change::Pin(pin) => {
                self.pins.insert(pin);
            }
            Change::RollbackTo | Change::Nothing => {}
        }
    }

    fn remember_prepared(&mut self, name: String, replay: Replay) {
        self.changed = true;
        self.prepared.retain(|(n, _)| *n != name);
        self.prepared.push((name, replay));
        self.check_size();
    }

    fn check_size(&mut self) {
        if self.state_bytes() > MAX_STATE_BYTES {
            self.pins.insert(Pin::TooMuchState);
        }
    }
}

/// What one pass over a statement's text found: words that a tracked
/// change needs, and words that may commit a block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Words {
    /// `set`, `reset`, `prepare`, `deallocate`, `discard`, `listen`,
    /// `unlisten`, `load`, `hold`, `temp…`, `advisory` (as in
    /// `pg_advisory_lock`), `rollback`, `do`: without one of them a statement
    /// changes nothing the tracker follows, so it need not be lexed.
    pub state: bool,
    /// `commit` or `end` (also `COMMIT PREPARED`).
    pub commit: bool,
}

/// Scans `sql` once, comparing only at the start of each alphanumeric run
/// (`_` and `$` separate runs, so `pg_advisory_lock` and `set_config` are
/// seen): every token the lexer could make starts at such a point, so this
/// finds at least what `classify` acts on. Case does not matter; a false
/// positive only costs a lex.
pub fn scan_words(sql: &str) -> Words {
    let text = sql.as_bytes();
    let mut words = Words::default();
    let mut i = 0;
    // Two tight loops, one over the gap before a run and one over the run,
    // with a table lookup per byte: this scan runs over every statement a
    // movable session sends, so it is kept to a few instructions a byte.
    while i < text.len() {
        while i < text.len() && BYTE_CLASS[text[i] as usize] == 0 {
            i += 1;
        }
        let Some(&first) = text.get(i) else { break };
        if BYTE_CLASS[first as usize] == FIRST_OF_WORD {
            look_for_words(&text[i..], &mut words);
        }
        i += 1;
        while i < text.len() && BYTE_CLASS[text[i] as usize] != 0 {
            i += 1;
        }
    }
    words
}

/// Compares the start of a run, `rest`, with the words its first letter
/// may begin.
#[inline]
fn look_for_words(rest: &[u8], words: &mut Words) {
    let at = |w: &[u8]| rest.len() >= w.len() && rest[..w.len()].eq_ignore_ascii_case(w);
    match rest[0].to_ascii_lowercase() {
        b's' => words.state |= at(b"set"),
        b'r' => words.state |= at(b"reset") || at(b"rollback"),
        b'p' => words.state |= at(b"prepare"),
        b'd' => words.state |= at(b"deallocate") || at(b"discard") || is_do(rest),
        b'l' => words.state |= at(b"listen") || at(b"load"),
        b'u' => words.state |= at(b"unlisten"),
        b'h' => words.state |= at(b"hold"),
        b't' => words.state |= at(b"temp"),
        b'a' => words.state |= at(b"advisory"),
        b'c' => words.commit |= at(b"commit"),
        b'e' => words.commit |= at(b"end"),
        _ => {}
    }
}

/// [`BYTE_CLASS`]: an ASCII letter or digit that starts none of the words.
const IN_RUN: u8 = 1;
/// [`BYTE_CLASS`]: the first letter of a word [`scan_words`] looks for.
const FIRST_OF_WORD: u8 = 2;

/// Per byte: 0 between runs (everything but ASCII letters and digits),
/// else [`IN_RUN`] or [`FIRST_OF_WORD`].
static BYTE_CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        if byte.is_ascii_alphanumeric() {
            class[b] = match byte.to_ascii_lowercase() {
                b's' | b'r' | b'p' | b'd' | b'l' | b'u' | b'h' | b't' | b'a' | b'c' | b'e' => {
                    FIRST_OF_WORD
                }
                _ => IN_RUN,
            };
        }
        b += 1;
    }
    class
};

/// `DO` as a word of its own (not `done`, `double`).
fn is_do(rest: &[u8]) -> bool {
    rest.len() >= 2
        && rest[..2].eq_ignore_ascii_case(b"do")
        && rest
            .get(2)
            .is_none_or(|b| !b.is_ascii_alphanumeric() && *b != b'_')
}

/// Whether `sql` holds a word that a tracked change needs
/// ([`scan_words`]).
pub fn might_change_state(sql: &str) -> bool {
    scan_words(sql).state
}

/// What one statement does to session state.
fn classify(text: &str, tokens: &[Token<'_>]) -> Change {
    if let Some(pin) = pinning_call(tokens) {
        return Change::Pin(pin);
    }
    let word = |i: usize| tokens.get(i).map(|t| t.text().to_ascii_lowercase());
    let is = |i: usize, kw: &str| tokens.get(i).is_some_and(|t| t.is(kw));
    match word(0).as_deref() {
        Some("set") if is(1, "local") || is(1, "transaction") => Change::Nothing,
        Some("set") => Change::Guc(text.to_string()),
        Some("reset") if is(1, "all") => Change::ResetAll,
        Some("reset") => Change::Guc(text.to_string()),
        // Two-phase commit: what happens to the block's settings is not
        // followed.
        Some("prepare") if is(1, "transaction") => Change::Pin(Pin::Unparsed),
        Some("rollback") if tokens.iter().skip(1).take(2).any(|t| t.is("to")) => Change::RollbackTo,
        Some("prepare") => match tokens.get(1) {
            Some(Token::Word(name)) => Change::Prepare {
                name: name.to_ascii_lowercase(),
                sql: text.to_string(),
            },
            _ => Change::Pin(Pin::Unparsed),
        },
        Some("deallocate") => {
            let at = if is(1, "prepare") { 2 } else { 1 };
            match tokens.get(at) {
                Some(t) if t.is("all") => Change::Deallocate(None),
                Some(Token::Word(name)) => Change::Deallocate(Some(name.to_ascii_lowercase())),
                _ => Change::Pin(Pin::Unparsed),
            }
        }
        Some("listen") => match tokens.get(1) {
            Some(t @ (Token::Word(_) | Token::Quoted(_))) => Change::Listen(t.text().to_string()),
            _ => Change::Pin(Pin::Unparsed),
        },
        Some("unlisten") => match tokens.get(1) {
            Some(Token::Other("*")) => Change::Unlisten(None),
            Some(t @ (Token::Word(_) | Token::Quoted(_))) => {
                Change::Unlisten(Some(t.text().to_string()))
            }
            _ => Change::Pin(Pin::Unparsed),
        },
        Some("discard") if is(1, "all") => Change::DiscardAll,
        Some("discard") if is(1, "temp") || is(1, "temporary") => Change::DiscardTemp,
        Some("load") => Change::Pin(Pin::Load),
        // An anonymous code block may do anything (set_config, temporary
        // tables) where the lexer cannot see it.
        Some("do") => Change::Pin(Pin::Unparsed),
        Some("declare")
            if tokens
                .windows(2)
                .any(|w| w[0].is("with") && w[1].is("hold")) =>
        {
            Change::Pin(Pin::HoldCursor)
        }
        _ if creates_temp(tokens) => Change::Pin(Pin::TempObject),
        _ => Change::Nothing,
    }
}

/// `CREATE [GLOBAL|LOCAL] TEMP|TEMPORARY …` and `… INTO TEMP …`.
fn creates_temp(tokens: &[Token<'_>]) -> bool {
    let temp = |t: &Token<'_>| t.is("temp") || t.is("temporary");
    let create = tokens.first().is_some_and(|t| t.is("create"));
    let early = tokens.iter().skip(1).take(3).any(temp);
    let into = tokens.windows(2).any(|w| w[0].is("into") && temp(&w[1]));
    (create && early) || into
}

/// A call of a function that changes session state in a way no replay
/// reproduces: session advisory locks and `set_config` (whose third
/// argument is rarely a literal the tracker could trust).
fn pinning_call(tokens: &[Token<'_>]) -> Option<Pin> {
    tokens.windows(2).find_map(|w| {
        if w[1] != Token::Other("(") {
            return None;
        }
        let name = w[0].text().to_ascii_lowercase();
        match name.as_str() {
            "pg_advisory_lock"
            | "pg_advisory_lock_shared"
            | "pg_try_advisory_lock"
            | "pg_try_advisory_lock_shared" => Some(Pin::AdvisoryLock),
            "set_config" => Some(Pin::SetConfig),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests;
