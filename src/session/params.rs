//! The session's own settings, read from its startup parameters.
//!
//! A client picks its target and budgets per session, libpq-style, either in
//! `options` (`-c pgpivot.target_session_attrs=standby`, also `--name=value`)
//! or as startup parameters named `pgpivot.*`. Both are removed before the
//! startup packet goes to the backend, which would reject unknown settings.

use std::time::Duration;

use super::error::AdmitError;
use crate::config::ListenerSettings;
use crate::protocol::startup::StartupMessage;
use crate::routing::{LagBudget, Target};

const PREFIX: &str = "pgpivot.";

/// What the session asked for, after listener defaults.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub target: Target,
    pub budget: LagBudget,
}

/// Reads (and removes) the `pgpivot.*` settings from `startup`.
pub fn extract(
    startup: &mut StartupMessage,
    listener: &ListenerSettings,
) -> Result<SessionRequest, AdmitError> {
    let mut request = SessionRequest {
        target: listener.target,
        budget: listener.budget,
    };
    let mut settings = Vec::new();
    if let Some(options) = startup.param("options").map(str::to_owned) {
        let (kept, ours) = split_options(&options);
        settings.extend(ours);
        startup.set_param("options", (!kept.is_empty()).then_some(kept.as_str()));
    }
    let direct: Vec<String> = startup
        .params()
        .filter_map(|(k, _)| std::str::from_utf8(k).ok())
        .filter(|k| k.starts_with(PREFIX))
        .map(str::to_owned)
        .collect();
    for name in direct {
        let value = startup.param(&name).unwrap_or_default().to_owned();
        startup.set_param(&name, None);
        settings.push((name, value));
    }
    for (name, value) in settings {
        apply(&mut request, &name, &value, &listener.ceiling)?;
    }
    Ok(request)
}

/// Applies one setting; budgets looser than the listener's ceiling are
/// refused like malformed values.
fn apply(
    request: &mut SessionRequest,
    name: &str,
    value: &str,
    ceiling: &LagBudget,
) -> Result<(), AdmitError> {
    let bad = || AdmitError::BadParameter {
        name: name.to_string(),
        value: value.to_string(),
    };
    match &name[PREFIX.len()..] {
        "target_session_attrs" => request.target = Target::parse(value).ok_or_else(bad)?,
        "max_lag_ms" => {
            let ms: u64 = value.parse().map_err(|_| bad())?;
            let lag = Duration::from_millis(ms);
            if ceiling.max_lag.is_some_and(|max| lag > max) {
                return Err(bad());
            }
            request.budget.max_lag = Some(lag);
        }
        "max_lag_bytes" => {
            let bytes: u64 = value.parse().map_err(|_| bad())?;
            if ceiling.max_bytes.is_some_and(|max| bytes > max) {
                return Err(bad());
            }
            request.budget.max_bytes = Some(bytes);
        }
        _ => return Err(bad()),
    }
    Ok(())
}

/// Splits a libpq `options` string into the part to forward and the
/// `pgpivot.*` settings (name, value). Tokens are separated by unescaped
/// whitespace, `\` escapes the next character (PostgreSQL's pg_split_opts).
fn split_options(options: &str) -> (String, Vec<(String, String)>) {
    let tokens = tokenize(options);
    let mut kept: Vec<&str> = Vec::new();
    let mut ours = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let text = &tokens[i].1;
        let (setting, used) = match text.as_str() {
            "-c" if i + 1 < tokens.len() => (Some(tokens[i + 1].1.as_str()), 2),
            t if t.starts_with("-c") => (Some(&t[2..]), 1),
            t if t.starts_with("--") => (Some(&t[2..]), 1),
            _ => (None, 1),
        };
        let parsed = setting
            .and_then(|s| s.split_once('='))
            .filter(|(name, _)| name.starts_with(PREFIX));
        match parsed {
            Some((name, value)) => ours.push((name.to_string(), value.to_string())),
            None => kept.extend(tokens[i..i + used].iter().map(|(r, _)| r.as_str())),
        }
        i += used;
    }
    (kept.join(" "), ours)
}

/// (raw text, unescaped text) of each whitespace-separated token.
fn tokenize(s: &str) -> Vec<(String, String)> {
    let mut tokens = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return tokens;
        }
        let (mut raw, mut text) = (String::new(), String::new());
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            raw.push(c);
            if c == '\\' {
                if let Some(escaped) = chars.next() {
                    raw.push(escaped);
                    text.push(escaped);
                }
            } else {
                text.push(c);
            }
        }
        tokens.push((raw, text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> ListenerSettings {
        ListenerSettings {
            address: "127.0.0.1:1".parse().unwrap(),
            target: Target::ReadWrite,
            budget: LagBudget::default(),
            ceiling: LagBudget {
                max_bytes: Some(1_000_000),
                max_lag: None,
            },
            max_connections: 10,
            on_lag: crate::config::OnLag::Stay,
        }
    }

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        let mut s = StartupMessage::new(196608);
        for (k, v) in params {
            s.set_param(k, Some(v));
        }
        s
    }

    #[test]
    fn options_settings_are_read_and_removed() {
        let mut s = startup(&[(
            "options",
            "-c pgpivot.target_session_attrs=standby -c work_mem=64MB --pgpivot.max_lag_ms=50 -cpgpivot.max_lag_bytes=1000",
        )]);
        let r = extract(&mut s, &listener()).unwrap();
        assert_eq!(r.target, Target::Standby);
        assert_eq!(r.budget.max_lag, Some(Duration::from_millis(50)));
        assert_eq!(r.budget.max_bytes, Some(1000));
        assert_eq!(s.param("options"), Some("-c work_mem=64MB"));
    }

    #[test]
    fn only_pgpivot_options_removes_the_parameter() {
        let mut s = startup(&[
            ("user", "u"),
            ("options", "-c pgpivot.target_session_attrs=any"),
        ]);
        extract(&mut s, &listener()).unwrap();
        assert_eq!(s.param("options"), None);
        assert_eq!(s.param("user"), Some("u"));
    }

    #[test]
    fn direct_parameters_work_too() {
        let mut s = startup(&[("pgpivot.target_session_attrs", "read-only")]);
        let r = extract(&mut s, &listener()).unwrap();
        assert_eq!(r.target, Target::ReadOnly);
        assert_eq!(s.params().count(), 0);
    }

    #[test]
    fn escaped_spaces_survive() {
        let mut s = startup(&[(
            "options",
            r"-c application_name=a\ b -c pgpivot.max_lag_ms=1",
        )]);
        extract(&mut s, &listener()).unwrap();
        assert_eq!(s.param("options"), Some(r"-c application_name=a\ b"));
    }

    #[test]
    fn bad_values_and_unknown_settings_are_rejected() {
        for opt in [
            "-c pgpivot.target_session_attrs=leader",
            "-c pgpivot.max_lag_ms=soon",
            "-c pgpivot.nope=1",
            "-c pgpivot.max_lag_bytes=2000000",
        ] {
            let mut s = startup(&[("options", opt)]);
            let e = extract(&mut s, &listener()).unwrap_err();
            assert!(matches!(e, AdmitError::BadParameter { .. }), "{opt}");
        }
    }
}
