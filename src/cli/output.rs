//! Rendering for the CLI: `key: value` blocks, aligned tables with a `─` rule under the
//! header, timestamps as `2026-05-05 12:37:01 +0000`, and JSON for `--json`.
//!
//! Values may come from files someone else edited (descriptions, common names), so control
//! characters are escaped before they reach a terminal.

use std::fmt::Write as _;

use serde::Serialize;
use time::OffsetDateTime;

/// A timestamp the way the tables show it, always in UTC.
pub fn human_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second] +0000"
        ))
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Escapes control characters (terminal escape sequences, newlines) in a value.
pub fn clean(value: &str) -> String {
    if !value.chars().any(char::is_control) {
        return value.to_owned();
    }
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `key: value` lines in the order they were pushed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Block {
    rows: Vec<(String, String)>,
}

impl Block {
    pub fn new() -> Self {
        Block::default()
    }

    pub fn row(mut self, key: &str, value: impl AsRef<str>) -> Self {
        self.rows.push((key.to_owned(), clean(value.as_ref())));
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.rows {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{k}: {v}");
        }
        out
    }
}

/// Columns padded to their widest cell, a `─` rule per column under the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells.iter().map(|c| clean(c)).collect();
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let widths: Vec<usize> = self
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                self.rows
                    .iter()
                    .map(|r| width(&r[i]))
                    .chain(std::iter::once(width(h)))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                if i > 0 {
                    l.push(' ');
                }
                l.push_str(c);
                l.extend(std::iter::repeat_n(' ', w - width(c)));
            }
            l.trim_end().to_owned()
        };
        let mut out = String::new();
        out.push_str(&line(&self.headers));
        out.push('\n');
        let rule: Vec<String> = widths.iter().map(|w| "─".repeat(*w)).collect();
        out.push_str(&rule.join(" "));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

/// Pretty JSON with a trailing newline.
pub fn json<T: Serialize>(value: &T) -> String {
    // Serialising our own plain view structs cannot fail; an empty object is a safe fallback.
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_rules_each_one() {
        let mut t = Table::new(&["ID", "CIDR", "Description", "Status"]);
        t.row(vec![
            "38c466b6".into(),
            "1.2.3.4/32".into(),
            "My Office IP".into(),
            "Authorizing".into(),
        ]);
        t.row(vec![
            "1f".into(),
            "2001:db8::/48".into(),
            "".into(),
            "Authorized".into(),
        ]);
        let expected = "\
ID       CIDR          Description  Status
──────── ───────────── ──────────── ───────────
38c466b6 1.2.3.4/32    My Office IP Authorizing
1f       2001:db8::/48              Authorized
";
        assert_eq!(t.render(), expected);
    }

    #[test]
    fn table_header_wider_than_cells_and_empty_table() {
        let mut t = Table::new(&["Created At", "Status"]);
        assert!(t.is_empty());
        assert_eq!(t.render(), "Created At Status\n────────── ──────\n");
        t.row(vec!["x".into()]);
        assert_eq!(
            t.render(),
            "Created At Status\n────────── ──────\nx\n",
            "a short row is padded with empty cells and trailing spaces are trimmed"
        );
    }

    #[test]
    fn table_counts_characters_not_bytes() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["café".into(), "1".into()]);
        t.row(vec!["tea".into(), "2".into()]);
        assert_eq!(t.render(), "A    B\n──── ─\ncafé 1\ntea  2\n");
    }

    #[test]
    fn block_keeps_order_and_escapes_control_characters() {
        let b = Block::new()
            .row("cidr", "1.2.3.4/32")
            .row("description", "evil\x1b[2Jtext\nnext")
            .row("id", "");
        assert_eq!(
            b.render(),
            "cidr: 1.2.3.4/32\ndescription: evil\\u{1b}[2Jtext\\nnext\nid: \n"
        );
    }

    #[test]
    fn human_time_is_utc_with_offset() {
        let t = time::macros::datetime!(2026-05-05 14:37:01 +02:00);
        assert_eq!(human_time(t), "2026-05-05 12:37:01 +0000");
    }
}
