//! YAML errors that never repeat the input.
//!
//! serde_yaml_ng's errors quote the offending scalar (`invalid type: string "<the scalar>",
//! expected a sequence`), and the config and the KEK file hold keys: a KEK file written as bare
//! base64, or `encryption_key` given as one string, would print the key. [`describe`] rebuilds
//! the message from what is not input: the field (only when it is one of the known names), the
//! kind of problem, what was found (its type, never its value), what was expected (from our
//! types), and the line and column.

use std::fmt::Write;

/// One line for `e`: `` `field`: problem (line L, column C) ``, with nothing copied from the
/// input except an unknown field's name when it is a plain identifier (see [`plain_name`]).
/// `fields` are the names the document may use.
pub(crate) fn describe(e: &serde_yaml_ng::Error, fields: &[&str]) -> String {
    let text = e.to_string();
    let location = e.location();
    let mut body = text.as_str();
    if let Some(l) = &location {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        body = body.strip_suffix(&suffix).unwrap_or(body);
    }
    let (field, problem) = match split_field(body, fields) {
        Some((field, rest)) => (Some(field), message(rest, fields)),
        None => (None, message(body, fields)),
    };
    let mut out = String::new();
    if let Some(field) = field {
        let _ = write!(out, "`{field}`: ");
    }
    out.push_str(&problem);
    if let Some(l) = location {
        let _ = write!(out, " (line {}, column {})", l.line(), l.column());
    }
    out
}

/// `field: rest` or `field[N]: rest` with a known field, as serde_yaml_ng prefixes the path.
fn split_field<'a>(body: &'a str, fields: &[&str]) -> Option<(&'a str, &'a str)> {
    let (path, rest) = body.split_once(": ")?;
    let name = match path.split_once('[') {
        Some((name, index)) => {
            let digits = index.strip_suffix(']')?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            name
        }
        None => path,
    };
    fields.contains(&name).then_some((path, rest))
}

/// The problem, rebuilt from serde's message forms; anything else is kept only when it cannot
/// be input (see [`fixed_phrase`]).
fn message(body: &str, fields: &[&str]) -> String {
    for (prefix, lead) in [
        ("invalid type: ", None),
        ("invalid value: ", Some("invalid value")),
    ] {
        if let Some(rest) = body.strip_prefix(prefix) {
            // The expected part is ours (a type's description) and comes last.
            let Some((found, expected)) = rest.rsplit_once(", expected ") else {
                break;
            };
            let expected = expected_text(expected);
            return match lead {
                None => format!("expected {expected}, found {}", kind(found)),
                Some(lead) => format!("{lead} ({}), expected {expected}", kind(found)),
            };
        }
    }
    if let Some(rest) = body.strip_prefix("invalid length ") {
        if let Some((_, expected)) = rest.rsplit_once(", expected ") {
            return format!(
                "wrong number of entries, expected {}",
                expected_text(expected)
            );
        }
    }
    if let Some(rest) = body.strip_prefix("unknown field `") {
        // "unknown field `NAME`, expected one of `a`, `b`": the list is ours.
        let (name, list) = match rest.rsplit_once("`, expected ") {
            Some((name, list)) => (name, Some(list)),
            None => (rest.split('`').next().unwrap_or_default(), None),
        };
        let mut out = match plain_name(name) {
            true => format!("unknown field `{name}`"),
            false => "unknown field".to_string(),
        };
        if let Some(list) = list {
            let _ = write!(out, ", expected {list}");
        }
        return out;
    }
    for prefix in ["missing field `", "duplicate field `"] {
        if let Some(rest) = body.strip_prefix(prefix) {
            let what = &prefix[..prefix.len() - 2];
            return match rest.strip_suffix('`') {
                Some(name) if fields.contains(&name) => format!("{what} `{name}`"),
                _ => what.to_string(),
            };
        }
    }
    // Our own range messages (config.rs).
    if body.starts_with("must be ") && fixed_phrase(body) {
        return body.to_string();
    }
    // What is left: syntax errors from the YAML scanner and parser ("mapping values are not
    // allowed in this context at line 2 column 5, while parsing ..."), fixed phrases.
    let phrase = body.split(" at line ").next().unwrap_or_default();
    let phrase = phrase.split(" at position ").next().unwrap_or_default();
    if !phrase.is_empty() && fixed_phrase(phrase) {
        format!("not valid YAML: {phrase}")
    } else {
        "not valid YAML".to_string()
    }
}

/// serde's `expected` text: `struct Options` reads better as what it is.
fn expected_text(expected: &str) -> String {
    if expected.starts_with("struct ") {
        "a mapping of fields".to_string()
    } else {
        expected.to_string()
    }
}

/// What serde's `Unexpected` found, without its value (`string "..."`, ``integer `5` ``).
fn kind(found: &str) -> &'static str {
    const KINDS: [(&str, &str); 11] = [
        ("string", "a string"),
        ("integer", "an integer"),
        ("floating point", "a floating-point number"),
        ("boolean", "a boolean"),
        ("character", "a character"),
        ("byte array", "bytes"),
        ("unit value", "an empty value"),
        ("Option value", "an optional value"),
        ("sequence", "a sequence"),
        ("map", "a mapping"),
        ("newtype struct", "a value"),
    ];
    KINDS
        .iter()
        .find(|(prefix, _)| found.starts_with(prefix))
        .map_or("a value of another type", |&(_, name)| name)
}

/// True for a name that may be repeated back: an identifier (`[a-z0-9_]`) with no run of 12
/// characters of the base64 alphabet, so that no part of a key can be echoed through it.
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name.split('_').all(|run| run.len() < 12)
}

/// True for text that cannot carry input: no quoting (serde and the YAML parser quote what
/// they copy from the input, with `"`, `` ` `` or a `!` tag) and no run of 12 or more base64
/// characters other than a lowercase word.
fn fixed_phrase(text: &str) -> bool {
    if text.contains(['"', '`', '!']) {
        return false;
    }
    let base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    text.split(|c: char| !base64(c))
        .all(|run| run.len() < 12 || run.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Base64 of 32 and of 48 bytes: a raw key and a KEK-wrapped one, for the tests that look for
/// key material in messages.
#[cfg(test)]
pub(crate) const TEST_KEYS: [&str; 2] = [
    "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=",
    "3q2+7wEjRWeJq83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4mrze8BI0Vn",
];

/// Panics if `text` holds any 12 characters in a row of [`TEST_KEYS`].
#[cfg(test)]
pub(crate) fn assert_no_key(text: &str) {
    for key in TEST_KEYS {
        for start in 0..=key.len() - 12 {
            assert!(!text.contains(&key[start..start + 12]), "{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        #[serde(default)]
        keys: Vec<String>,
        #[serde(default)]
        count: u16,
    }

    const FIELDS: &[&str] = &["name", "keys", "count"];
    const KEY: &str = TEST_KEYS[0];

    fn err(text: &str) -> String {
        let e = serde_yaml_ng::from_str::<Doc>(text).unwrap_err();
        describe(&e, FIELDS)
    }

    #[test]
    fn serde_itself_quotes_the_scalar() {
        // Why this module exists; if serde_yaml_ng ever stops quoting, it can go.
        let e = serde_yaml_ng::from_str::<Doc>(&format!("name: x\nkeys: {KEY}\n")).unwrap_err();
        assert!(e.to_string().contains(KEY), "{e}");
    }

    #[test]
    fn no_value_is_repeated_and_the_field_is_named() {
        for (text, want) in [
            (
                format!("name: x\nkeys: {KEY}\n"),
                "`keys`: expected a sequence, found a string (line 2, column 7)",
            ),
            (
                format!("name: x\nkeys: [[{KEY}]]\n"),
                "`keys[0]`: expected a string, found a sequence (line 2, column 8)",
            ),
            (
                format!("name: x\ncount: {KEY}\n"),
                "`count`: expected u16, found a string (line 2, column 8)",
            ),
            (
                "name: x\ncount: 100000\n".to_string(),
                "`count`: invalid value (an integer), expected u16 (line 2, column 8)",
            ),
            (
                KEY.to_string(),
                "expected a mapping of fields, found a string (line 1, column 1)",
            ),
            (
                format!("{KEY}: 1\n"),
                "unknown field, expected one of `name`, `keys`, `count` (line 1, column 1)",
            ),
            (
                "name: x\nnmae: y\n".to_string(),
                "unknown field `nmae`, expected one of `name`, `keys`, `count` (line 2, column 1)",
            ),
            (
                "count: 1\n".to_string(),
                "missing field `name` (line 1, column 1)",
            ),
            (
                format!("name: x\nkeys: \"{KEY}\n"),
                "not valid YAML: found unexpected end of stream (line 3, column 1)",
            ),
            (
                format!("name: x\nkeys: {{{KEY}: 1}}\n"),
                "`keys`: expected a sequence, found a mapping (line 2, column 7)",
            ),
        ] {
            let got = err(&text);
            assert_no_key(&got);
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn names_and_phrases_that_may_be_echoed() {
        assert!(plain_name("num_queus") && plain_name("bogus_field"));
        assert!(!plain_name("encryptionkey0") && !plain_name("Abc") && !plain_name(""));
        assert!(fixed_phrase("did not find expected key"));
        assert!(fixed_phrase("invalid leading UTF-8 octet"));
        assert!(!fixed_phrase("found `x`") && !fixed_phrase(KEY));
        assert!(!fixed_phrase("q83vEjRWeJCr"));
    }
}
