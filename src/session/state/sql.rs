//! Just enough SQL lexing to tell what a statement does to session state:
//! statements split at top-level semicolons, comments skipped, strings,
//! quoted identifiers and dollar quotes kept whole, and each statement's
//! leading keywords and called function names read case-insensitively.
//! Anything it cannot read with certainty is reported as such, so that the
//! caller pins the session rather than guess.

/// One token of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token<'a> {
    /// A keyword or unquoted identifier, as written.
    Word(&'a str),
    /// A double-quoted identifier, quotes included.
    Quoted(&'a str),
    /// A string or dollar-quoted constant, quotes included.
    Literal(&'a str),
    /// Any other character run (numbers, operators, punctuation).
    Other(&'a str),
}

impl Token<'_> {
    /// Whether this is the keyword `kw` (ASCII case-insensitive).
    pub fn is(&self, kw: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(kw))
    }

    pub fn text(&self) -> &str {
        match self {
            Token::Word(t) | Token::Quoted(t) | Token::Literal(t) | Token::Other(t) => t,
        }
    }
}

/// The statements of a simple Query, each as its source text and tokens.
/// `None` if the text cannot be lexed with certainty (an unterminated
/// string or comment).
pub fn statements(sql: &str) -> Option<Vec<(&str, Vec<Token<'_>>)>> {
    let mut out = Vec::new();
    let mut tokens = Vec::new();
    let mut start = 0;
    let mut lexer = Lexer { sql, at: 0 };
    while let Some(token) = lexer.next()? {
        if token == Token::Other(";") {
            push(
                &mut out,
                &sql[start..lexer.at - 1],
                std::mem::take(&mut tokens),
            );
            start = lexer.at;
        } else {
            tokens.push(token);
        }
    }
    push(&mut out, &sql[start..], tokens);
    Some(out)
}

fn push<'a>(out: &mut Vec<(&'a str, Vec<Token<'a>>)>, text: &'a str, tokens: Vec<Token<'a>>) {
    if !tokens.is_empty() {
        out.push((text.trim(), tokens));
    }
}

struct Lexer<'a> {
    sql: &'a str,
    at: usize,
}

impl<'a> Lexer<'a> {
    /// The next token; `Ok(None)` at the end, `None` (outer) on text that
    /// cannot be lexed with certainty.
    fn next(&mut self) -> Option<Option<Token<'a>>> {
        let bytes = self.sql.as_bytes();
        loop {
            let rest = &bytes[self.at..];
            match rest {
                [] => return Some(None),
                [c, ..] if c.is_ascii_whitespace() => self.at += 1,
                [b'-', b'-', ..] => {
                    let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
                    self.at += end;
                }
                [b'/', b'*', ..] => self.at += block_comment(rest)?,
                _ => break,
            }
        }
        let start = self.at;
        let rest = &bytes[start..];
        let len = match rest[0] {
            b'\'' => quoted(rest, b'\'')?,
            b'"' => quoted(rest, b'"')?,
            b'$' => dollar_quoted(rest).unwrap_or(1),
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => rest
                .iter()
                .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80))
                .unwrap_or(rest.len()),
            _ => 1,
        };
        // E'...' and similar prefixed strings: the prefix is a word, the
        // string follows; both kept, which is enough here.
        self.at += len;
        let text = &self.sql[start..self.at];
        Some(Some(match rest[0] {
            b'\'' | b'$' if len > 1 => Token::Literal(text),
            b'"' => Token::Quoted(text),
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => Token::Word(text),
            _ => Token::Other(text),
        }))
    }
}

/// Length of a nested `/* */` comment at the start of `s`.
fn block_comment(s: &[u8]) -> Option<usize> {
    let mut depth = 0;
    let mut i = 0;
    while i + 1 < s.len() {
        match &s[i..i + 2] {
            b"/*" => {
                depth += 1;
                i += 2;
            }
            b"*/" => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Length of a `q`-quoted token (doubled quotes inside) at the start of `s`.
fn quoted(s: &[u8], q: u8) -> Option<usize> {
    let mut i = 1;
    loop {
        match s.get(i)? {
            &c if c == q && s.get(i + 1) == Some(&q) => i += 2,
            &c if c == q => return Some(i + 1),
            // A backslash may escape a quote in E'' strings: too uncertain.
            b'\\' if q == b'\'' => return None,
            _ => i += 1,
        }
    }
}

/// Length of a `$tag$ ... $tag$` constant at the start of `s`, if it is one.
fn dollar_quoted(s: &[u8]) -> Option<usize> {
    let tag_end = s[1..].iter().position(|&c| c == b'$').map(|p| p + 2)?;
    let tag = &s[..tag_end];
    if !tag[1..tag.len() - 1]
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'_')
    {
        return None;
    }
    let body = &s[tag_end..];
    let close = body.windows(tag.len()).position(|w| w == tag)?;
    Some(tag_end + close + tag.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> Vec<Vec<String>> {
        statements(sql)
            .unwrap()
            .into_iter()
            .map(|(_, t)| t.iter().map(|t| t.text().to_string()).collect())
            .collect()
    }

    #[test]
    fn statements_split_at_top_level_semicolons_only() {
        let got = words("SET a = 'x;y'; /* ; */ select $f$ ; $f$ -- ;\n; LISTEN \"a;b\"");
        assert_eq!(
            got,
            vec![
                vec!["SET", "a", "=", "'x;y'"],
                vec!["select", "$f$ ; $f$"],
                vec!["LISTEN", "\"a;b\""],
            ]
        );
    }

    #[test]
    fn uncertain_text_is_reported() {
        for sql in [
            "select 'open",
            "/* open",
            "select E'a\\'b'",
            "select \"open",
        ] {
            assert!(statements(sql).is_none(), "{sql}");
        }
        assert_eq!(
            words("select $1, $$x$$"),
            vec![vec!["select", "$", "1", ",", "$$x$$"]]
        );
    }
}
