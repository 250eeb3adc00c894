//! Configuration files: parse, check, and say everything that is wrong in one go.
//!
//! `toml` with serde stops at the first problem. [`parse`] tries the whole document first; when that fails it
//! deserializes the defaults with one key of the document at a time, so each key's problem (a wrong type, an unknown
//! name, a bad value) is reported on its own, prefixed with the key's path. A syntax error is reported with its
//! line and column. The keys that had no problem make a configuration whose values [`load`] then checks too (the
//! server's `validate`). Every configuration struct must take `#[serde(default)]`, so a document of one key is
//! complete.

use std::path::Path;

use serde::de::DeserializeOwned;

/// A server's configuration type.
pub trait ServerConfig: DeserializeOwned + Default + Sized {
    /// The commented default file (`print-default-config`); it parses to exactly `Self::default()`.
    const DEFAULT_FILE: &'static str;

    /// Every problem of a parsed configuration, one per entry; empty when it is usable.
    fn validate(&self) -> Vec<String>;
}

/// Parses a TOML document into `C`; on failure, every problem found (see the module docs).
pub fn parse<C: DeserializeOwned>(text: &str) -> Result<C, Vec<String>> {
    match parse_partial(text) {
        (Some(config), problems) if problems.is_empty() => Ok(config),
        (_, problems) => Err(problems),
    }
}

/// Parses what it can: every problem, and — unless the syntax is broken — the configuration made of the keys that
/// had none (so its values can be checked too).
pub fn parse_partial<C: DeserializeOwned>(text: &str) -> (Option<C>, Vec<String>) {
    let whole = match toml::from_str::<C>(text) {
        Ok(config) => return (Some(config), Vec::new()),
        Err(e) => e,
    };
    // a syntax error: nothing else can be read
    let Ok(table) = text.parse::<toml::Table>() else {
        return (None, vec![whole.to_string().trim_end().to_string()]);
    };
    let mut problems = Vec::new();
    let mut rest = table.clone();
    for (path, alone) in leaves(&table) {
        if let Err(e) = toml::Value::Table(alone).try_into::<C>() {
            problems.push(format!("{path}: {}", first_line(&e.to_string())));
            remove(&mut rest, &path);
        }
    }
    if problems.is_empty() {
        // only the keys together are wrong
        problems.push(whole.to_string().trim_end().to_string());
    }
    (toml::Value::Table(rest).try_into::<C>().ok(), problems)
}

/// Reads, parses and validates the file at `path`: the configuration, or every problem — those of the keys that
/// could not be read, then the values of the rest.
pub fn load<C: ServerConfig>(path: &Path) -> Result<C, Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let (config, mut problems) = parse_partial::<C>(&text);
    if let Some(config) = &config {
        problems.extend(config.validate());
    }
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(problems),
    }
}

/// Removes the leaf at the dotted `path` (a key that itself holds a dot is looked up whole first).
fn remove(table: &mut toml::Table, path: &str) {
    if table.remove(path).is_some() {
        return;
    }
    if let Some((head, tail)) = path.split_once('.')
        && let Some(toml::Value::Table(inner)) = table.get_mut(head)
    {
        remove(inner, tail);
    }
}

fn first_line(message: &str) -> &str {
    message.lines().find(|l| !l.trim().is_empty()).unwrap_or(message).trim()
}

/// Each leaf of `table` (a value that is not a table; arrays count as one) as its dotted path and a document
/// holding only it.
fn leaves(table: &toml::Table) -> Vec<(String, toml::Table)> {
    let mut out = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) if !inner.is_empty() => {
                for (path, alone) in leaves(inner) {
                    let mut outer = toml::Table::new();
                    outer.insert(key.clone(), toml::Value::Table(alone));
                    out.push((format!("{key}.{path}"), outer));
                }
            }
            _ => {
                let mut alone = toml::Table::new();
                alone.insert(key.clone(), value.clone());
                out.push((key.clone(), alone));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        name: String,
        port: u16,
        inner: Inner,
    }

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        size: u32,
        flag: bool,
    }

    #[test]
    fn a_good_document_parses() {
        let sample: Sample = parse("name = \"a\"\n[inner]\nsize = 3\n").unwrap();
        assert_eq!(
            sample,
            Sample { name: "a".into(), port: 0, inner: Inner { size: 3, flag: false } }
        );
    }

    #[test]
    fn every_key_in_error_is_reported() {
        let problems = parse::<Sample>(
            "name = 5\nport = \"x\"\nunknown = 1\n[inner]\nsize = -1\nflag = true\nextra = 2\n",
        )
        .unwrap_err();
        let text = problems.join("\n");
        for key in ["name:", "port:", "unknown:", "inner.size:", "inner.extra:"] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} missing in\n{text}");
        }
        assert_eq!(problems.len(), 5, "{text}");
        assert!(text.contains("unknown field"), "{text}");
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let problems = parse::<Sample>("name = \"a\"\nport = = 3\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("line 2"), "{}", problems[0]);
    }
}
