//! The word scans of statement texts seen lately on this thread.
//!
//! Most applications send the same few statement texts over and over (an
//! unnamed Parse per execution, in libpq's `PQexecParams`, psycopg, JDBC's
//! first executions, pgbench `-M extended`), and every session of a worker
//! sends the same ones. [`scan_words`](super::scan_words) is a few
//! instructions a byte; looking a text up here is a hash of its length and
//! two words plus one comparison of the whole text, so a repeated text is
//! not scanned again.
//!
//! The answer is exact: a slot holds the whole text it was computed from,
//! and only a byte-for-byte equal text gets it (a different text that maps
//! to the same slot is scanned, and replaces it). The cache is per thread
//! (no lock, no atomics; sessions of one worker share it) and fixed in size:
//! [`SLOTS`] slots of up to [`MAX_TEXT`] bytes, allocated once per thread;
//! longer texts are always scanned.

use std::cell::RefCell;

use super::{scan_words, Words};

/// Slots per thread (a power of two).
const SLOTS: usize = 64;
/// The longest text a slot keeps.
const MAX_TEXT: usize = 256;

struct Slot {
    len: usize,
    text: [u8; MAX_TEXT],
    words: Words,
}

thread_local! {
    static RECENT: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// [`scan_words`] of the statement text `text`, from this thread's recent
/// texts when it is one; `None` when it is not UTF-8. Only a text not seen
/// lately is checked: one in a slot was checked when it went in.
pub fn scan_words_recent(text: &[u8]) -> Option<Words> {
    let scan = || std::str::from_utf8(text).ok().map(scan_words);
    if text.len() > MAX_TEXT {
        return scan();
    }
    RECENT.with(|recent| {
        let Ok(mut slots) = recent.try_borrow_mut() else {
            return scan();
        };
        if slots.is_empty() {
            slots.extend((0..SLOTS).map(|_| Slot {
                len: usize::MAX,
                text: [0; MAX_TEXT],
                words: Words::default(),
            }));
        }
        let slot = &mut slots[slot_of(text)];
        if slot.len == text.len() && slot.text[..text.len()] == *text {
            return Some(slot.words);
        }
        let words = scan()?;
        slot.len = text.len();
        slot.text[..text.len()].copy_from_slice(text);
        slot.words = words;
        Some(words)
    })
}

/// The slot for `text`: its length and its first and last eight bytes,
/// mixed. Only which slot is tried depends on this; the answer does not.
fn slot_of(text: &[u8]) -> usize {
    let word = |at: usize| {
        let mut eight = [0u8; 8];
        let end = text.len().min(at + 8);
        eight[..end - at].copy_from_slice(&text[at..end]);
        u64::from_le_bytes(eight)
    };
    let last = text.len().saturating_sub(8);
    let mixed = (word(0) ^ word(last).rotate_left(29) ^ text.len() as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 58) as usize % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_text_gets_the_scan_it_would_get() {
        // Texts that differ only in a word, in their middle, or in length,
        // many more than there are slots, each asked for several times.
        let mut texts: Vec<String> = Vec::new();
        for i in 0..200 {
            texts.push(format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {i}"
            ));
            texts.push(format!("SELECT {i} FROM t; SET x = {i}"));
            texts.push(format!("select {i}; commit"));
        }
        texts.push("x".repeat(MAX_TEXT + 1) + " set");
        texts.push(String::new());
        for round in 0..3 {
            for text in &texts {
                assert_eq!(
                    scan_words_recent(text.as_bytes()),
                    Some(scan_words(text)),
                    "{text:?} (round {round})"
                );
            }
        }
    }

    #[test]
    fn texts_in_one_slot_replace_each_other_without_mixing_answers() {
        // Same length, same first and last eight bytes: one slot.
        let plain = "SELECT 1 FROM t WHERE aaaa = 1 /* tail of it */";
        let state = "SELECT 1 FROM t WHERE set  = 1 /* tail of it */";
        assert_eq!(plain.len(), state.len());
        assert_eq!(slot_of(plain.as_bytes()), slot_of(state.as_bytes()));
        for _ in 0..3 {
            assert!(!scan_words_recent(plain.as_bytes()).unwrap().state);
            assert!(scan_words_recent(state.as_bytes()).unwrap().state);
        }
    }

    #[test]
    fn a_text_that_is_not_utf8_is_never_taken_from_a_slot() {
        // Asked for again and again, it is checked every time, and a valid
        // text in its slot is not taken for it.
        let valid = "SELECT 'abc'";
        let invalid = b"SELECT '\xff\xfe\xfd'";
        assert_eq!(valid.len(), invalid.len());
        for _ in 0..3 {
            assert_eq!(scan_words_recent(invalid), None);
            assert!(scan_words_recent(valid.as_bytes()).is_some());
        }
        let long = [b"select ".as_slice(), &[0xff; MAX_TEXT]].concat();
        assert_eq!(scan_words_recent(&long), None);
    }
}
