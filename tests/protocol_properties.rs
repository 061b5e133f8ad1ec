//! Bounded property tests: the fuzz targets' invariants (tests/invariants)
//! on a few thousand generated inputs each, with a fixed seed, so that
//! `cargo test` checks them on every run without cargo-fuzz or a cluster.
//!
//! Inputs are mostly well-formed packets and messages, then mutated (bytes
//! flipped, lengths rewritten, cut short), with random chunking: random
//! bytes alone rarely get past a length word.

// Tests run on their own runtimes: tokio's timers are fine here (see src/timers.rs).
#![allow(clippy::disallowed_methods)]

mod invariants;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CASES: usize = 3000;
/// figment + toml + tracing's filter parser cost ~2 ms a config unoptimized.
const CONFIG_CASES: usize = 1500;

fn rng(salt: u64) -> StdRng {
    StdRng::seed_from_u64(0x5047_5049_564f_5400 ^ salt)
}

/// A chunking prefix for [`invariants::split`].
fn chunking(rng: &mut StdRng) -> Vec<u8> {
    let n = rng.random_range(0..16u8);
    let mut v = vec![n];
    v.extend((0..n).map(|_| rng.random::<u8>()));
    v
}

/// Flips bytes, rewrites a length word or cuts the input short, sometimes.
fn mutate(rng: &mut StdRng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(0..3) {
        if v.is_empty() {
            break;
        }
        let i = rng.random_range(0..v.len());
        match rng.random_range(0..6) {
            0 => v[i] = rng.random(),
            1 => v[i] ^= 1 << rng.random_range(0..8),
            2 => v.truncate(i),
            3 => {
                let len: u32 = match rng.random_range(0..4) {
                    0 => rng.random_range(0..16),
                    1 => u32::MAX - rng.random_range(0..16),
                    2 => 10_000 + rng.random_range(0..3),
                    _ => rng.random(),
                };
                let end = (i + 4).min(v.len());
                v[i..end].copy_from_slice(&len.to_be_bytes()[..end - i]);
            }
            4 => v.insert(i, 0),
            _ => {
                let extra: Vec<u8> = (0..rng.random_range(1..8)).map(|_| rng.random()).collect();
                v.splice(i..i, extra);
            }
        }
    }
    v
}

fn word(rng: &mut StdRng, words: &[&str]) -> String {
    words[rng.random_range(0..words.len())].to_string()
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

// ---------------------------------------------------------------- startup

fn startup_packet(rng: &mut StdRng) -> Vec<u8> {
    let (code, body): (u32, Vec<u8>) = match rng.random_range(0..5) {
        0 => (80877103, vec![]),
        1 => (80877104, vec![]),
        2 => {
            let secret = match rng.random_range(0..3) {
                0 => 4,
                1 => rng.random_range(0..300),
                _ => 32,
            };
            (
                80877102,
                random_bytes(rng, 4)
                    .into_iter()
                    .chain(random_bytes(rng, secret))
                    .collect(),
            )
        }
        3 => (rng.random(), random_bytes(rng, 16)),
        _ => {
            let mut body = Vec::new();
            for _ in 0..rng.random_range(0..5) {
                let name = word(
                    rng,
                    &[
                        "user",
                        "database",
                        "options",
                        "application_name",
                        "pgpivot.target_session_attrs",
                        "pgpivot.max_lag_ms",
                        "pgpivot.max_lag_bytes",
                        "pgpivot.nope",
                        "x",
                    ],
                );
                let value = match name.as_str() {
                    "options" => (0..rng.random_range(0..4))
                        .map(|_| {
                            word(
                                rng,
                                &[
                                    "-c",
                                    "-cpgpivot.max_lag_ms=5",
                                    "--pgpivot.target_session_attrs=standby",
                                    "pgpivot.max_lag_bytes=7",
                                    "-c\\ x",
                                    "work_mem=1MB",
                                    "\\",
                                    "--",
                                    " ",
                                    "\t",
                                ],
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => word(
                        rng,
                        &[
                            "any",
                            "standby",
                            "read-only",
                            "1000",
                            "-1",
                            "",
                            "\u{e9}",
                            "99999999999999999999",
                        ],
                    ),
                };
                body.extend_from_slice(name.as_bytes());
                body.push(0);
                body.extend_from_slice(value.as_bytes());
                body.push(0);
            }
            body.push(0);
            (196608 + rng.random_range(0..3), body)
        }
    };
    let mut v = ((body.len() + 8) as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend(body);
    v
}

#[test]
fn startup_parser_holds_on_generated_packets() {
    let mut rng = rng(1);
    for _ in 0..CASES {
        let mut input = chunking(&mut rng);
        let mut stream = Vec::new();
        for _ in 0..rng.random_range(1..4) {
            stream.extend(startup_packet(&mut rng));
        }
        input.extend(mutate(&mut rng, stream));
        invariants::startup(&input);
    }
    for _ in 0..CASES {
        invariants::startup(&random_bytes(&mut rng, 64));
    }
}

// ---------------------------------------------------------------- framer

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn framed_stream(rng: &mut StdRng) -> Vec<u8> {
    let mut stream = Vec::new();
    for _ in 0..rng.random_range(0..8) {
        let tag = b"ZSEKRDQCX"[rng.random_range(0..9)];
        let len = match rng.random_range(0..20) {
            0 => 64 * 1024 - 5 + rng.random_range(0..3),
            1..=3 => rng.random_range(0..2000),
            _ => rng.random_range(0..40),
        };
        let body = vec![rng.random::<u8>(); len];
        stream.extend(message(tag, &body));
    }
    stream
}

#[test]
fn framer_chunking_is_invisible() {
    let mut rng = rng(2);
    for _ in 0..CASES {
        let mut input = vec![rng.random::<u8>()];
        // Mostly no limit or a roomy one; sometimes one that messages hit.
        let max_len: u16 = match rng.random_range(0..3) {
            0 => 0x8000,
            1 => rng.random_range(0..200),
            _ => 0x7fff,
        };
        input.extend(max_len.to_be_bytes());
        input.extend(chunking(&mut rng));
        let stream = framed_stream(&mut rng);
        input.extend(mutate(&mut rng, stream));
        invariants::framer(&input);
    }
}

// ---------------------------------------------------------------- auth

fn backend_message(rng: &mut StdRng) -> Vec<u8> {
    let (tag, body): (u8, Vec<u8>) = match rng.random_range(0..9) {
        0 => {
            let code: u32 = word(rng, &["0", "3", "5", "10", "11", "12", "7", "99"])
                .parse()
                .unwrap();
            let mut body = code.to_be_bytes().to_vec();
            match code {
                5 => body.extend(random_bytes(rng, 4)),
                10 => {
                    for _ in 0..rng.random_range(0..4) {
                        body.extend(
                            word(
                                rng,
                                &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "X-PLUS", "\u{ff}"],
                            )
                            .as_bytes(),
                        );
                        body.push(0);
                    }
                    body.push(0);
                }
                11 | 12 => body.extend(b"r=abc,s=c2FsdA==,i=4096"),
                _ => {}
            }
            (b'R', body)
        }
        1 | 2 => {
            let name = word(rng, &["in_hot_standby", "server_version", "TimeZone"]);
            let value = word(rng, &["on", "off", "17.2", ""]);
            (
                b'S',
                [name.as_bytes(), &[0], value.as_bytes(), &[0]].concat(),
            )
        }
        3 => {
            let secret = if rng.random_bool(0.5) {
                4
            } else {
                rng.random_range(0..300)
            };
            (
                b'K',
                random_bytes(rng, 4)
                    .into_iter()
                    .chain(vec![7; secret])
                    .collect(),
            )
        }
        4 => (
            b'E',
            b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0".to_vec(),
        ),
        5 => (b'N', b"SNOTICE\0C00000\0Mhi\0\0".to_vec()),
        6 => (b'Z', word(rng, &["I", "T", "E", "X", ""]).into_bytes()),
        7 => (b'v', 196608u32.to_be_bytes().to_vec()),
        _ => (rng.random(), random_bytes(rng, 12)),
    };
    message(tag, &body)
}

#[test]
fn auth_stage_holds_on_generated_backends() {
    let mut rng = rng(3);
    for _ in 0..CASES {
        let mut input = vec![rng.random::<u8>()];
        input.extend(chunking(&mut rng));
        let mut stream = Vec::new();
        for _ in 0..rng.random_range(0..10) {
            stream.extend(backend_message(&mut rng));
        }
        input.extend(mutate(&mut rng, stream));
        invariants::auth(&input);
    }
}

#[test]
fn message_readers_hold_on_generated_bodies() {
    let mut rng = rng(4);
    for _ in 0..CASES {
        let m = backend_message(&mut rng);
        invariants::messages(&mutate(&mut rng, m[5..].to_vec()));
        invariants::messages(&random_bytes(&mut rng, 300));
    }
}

// ---------------------------------------------------------------- config

#[test]
fn config_loader_never_panics() {
    let example = include_str!("../config/pgpivot.toml");
    let lines: Vec<&str> = example.lines().collect();
    let values = [
        "0",
        "-1",
        "18446744073709551615",
        "9223372036854775807",
        "1e400",
        "\"\"",
        "\"x\"",
        "\"[::1]:0\"",
        "\"host:99999\"",
        "\":5432\"",
        "true",
        "[]",
        "{}",
        "\"info,a[{b=/x/}]=trace\"",
        "\"disconnect\"",
        "\"prefer-standby\"",
        "1979-05-27T07:32:00Z",
        "'''\n'''",
    ];
    let mut rng = rng(5);
    for _ in 0..CONFIG_CASES {
        let mut text = String::new();
        for line in &lines {
            match rng.random_range(0..40) {
                0 => continue,
                1 => {
                    // Replace a value.
                    if let Some((key, _)) = line.split_once('=') {
                        text.push_str(key);
                        text.push_str("= ");
                        text.push_str(values[rng.random_range(0..values.len())]);
                        text.push('\n');
                        continue;
                    }
                }
                2 => {
                    text.push_str(line);
                    text.push('\n');
                }
                _ => {}
            }
            text.push_str(line);
            text.push('\n');
        }
        let bytes = if rng.random_range(0..4) == 0 {
            mutate(&mut rng, text.into_bytes())
        } else {
            text.into_bytes()
        };
        invariants::config(&bytes);
    }
}

#[test]
fn harness_detects_a_hang() {
    let never = std::future::pending::<()>();
    let hung = std::panic::catch_unwind(|| invariants::block_on(never, 10));
    assert!(hung.is_err());
}
