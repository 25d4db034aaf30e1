//! The one place YAML is parsed. Every file pgmtls reads goes through [`Fields`], so every
//! error names the file, the key and the line, and all of a file's errors are reported at once
//! instead of one per edit-and-retry cycle.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_saphyr::Spanned;

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted path of the key (`rules[2].cidr`), or empty for the whole file.
    pub key: String,
    pub line: Option<u64>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one validation pass, across one or more files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    pub fn one(file: &Path, key: &str, line: Option<u64>, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            key: key.to_owned(),
            line,
            message: message.into(),
        }])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: ConfigErrors) {
        self.0.extend(other.0);
    }

    /// `Ok(v)` if nothing was collected, else all collected errors.
    pub fn into_result<T>(self, v: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(v)
        } else {
            Err(self)
        }
    }
}

/// Parses a whole YAML document into `T`, naming the file and line on failure. For files that
/// machines write (the state directory), where one error at a time is enough.
pub fn parse_doc<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigErrors> {
    serde_saphyr::from_str::<T>(text).map_err(|e| syntax_error(file, &e))
}

fn syntax_error(file: &Path, e: &serde_saphyr::Error) -> ConfigErrors {
    // serde-saphyr renders a snippet with line and column; keep its first line, which
    // carries the position, so the message stays one line per error.
    let text = e.to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("invalid YAML")
        .trim()
        .to_owned();
    ConfigErrors::one(file, "", None, first)
}

/// A top-level YAML mapping whose keys are taken one by one; whatever is left when
/// [`Fields::finish`] runs is an unknown key.
pub struct Fields {
    file: PathBuf,
    entries: Vec<(String, u64, Option<Value>)>,
    errors: ConfigErrors,
}

impl Fields {
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigErrors> {
        let raw: Option<Vec<(Spanned<String>, Value)>> = if text.trim().is_empty() {
            None
        } else {
            let map: indexmap_free::OrderedMap =
                serde_saphyr::from_str(text).map_err(|e| syntax_error(file, &e))?;
            Some(map.0)
        };
        let entries = raw
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.value, k.referenced.line(), Some(v)))
            .collect();
        Ok(Fields {
            file: file.to_path_buf(),
            entries,
            errors: ConfigErrors::default(),
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    fn take(&mut self, key: &str) -> Option<(u64, Value)> {
        let entry = self.entries.iter_mut().find(|(k, _, _)| k == key)?;
        let line = entry.1;
        entry.2.take().map(|v| (line, v))
    }

    /// Takes an optional key, converting its value with `convert`; a failed conversion is
    /// recorded against the key and line, and `None` is returned.
    pub fn optional_with<T>(
        &mut self,
        key: &str,
        convert: impl FnOnce(Value) -> Result<T, String>,
    ) -> Option<T> {
        let (line, value) = self.take(key)?;
        if value.is_null() {
            return None;
        }
        match convert(value) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.push(key, Some(line), msg);
                None
            }
        }
    }

    pub fn optional<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        self.optional_with(key, |v| {
            serde_json::from_value(v).map_err(|e| e.to_string())
        })
    }

    pub fn required_with<T>(
        &mut self,
        key: &str,
        convert: impl FnOnce(Value) -> Result<T, String>,
    ) -> Option<T> {
        let present = self
            .entries
            .iter()
            .any(|(k, _, v)| k == key && v.as_ref().is_some_and(|v| !v.is_null()));
        if !present {
            self.push(key, None, "is required");
            return None;
        }
        self.optional_with(key, convert)
    }

    pub fn required<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        self.required_with(key, |v| {
            serde_json::from_value(v).map_err(|e| e.to_string())
        })
    }

    /// Line of a key, for errors found after conversion (cross-field checks).
    pub fn line_of(&self, key: &str) -> Option<u64> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, l, _)| *l)
    }

    pub fn push(&mut self, key: &str, line: Option<u64>, message: impl Into<String>) {
        self.errors.0.push(ConfigError {
            file: self.file.clone(),
            key: key.to_owned(),
            line,
            message: message.into(),
        });
    }

    /// Reports keys nobody took as unknown and returns every error collected.
    pub fn finish(mut self) -> ConfigErrors {
        let unknown: Vec<(String, u64)> = self
            .entries
            .iter()
            .filter(|(_, _, v)| v.is_some())
            .map(|(k, l, _)| (k.clone(), *l))
            .collect();
        for (key, line) in unknown {
            self.push(&key, Some(line), "unknown key");
        }
        self.errors
    }
}

/// Converters shared by every file.
pub mod convert {
    use std::net::SocketAddr;
    use std::time::Duration;

    use serde_json::Value;

    pub fn duration(v: Value) -> Result<Duration, String> {
        let s = v
            .as_str()
            .ok_or("must be a duration such as \"10s\" or \"1m 30s\"")?;
        let d = humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
        if d.is_zero() {
            return Err("must be greater than zero".into());
        }
        Ok(d)
    }

    /// A duration, or `off` (also `0`) for none. Keepalive settings take whole seconds.
    pub fn duration_or_off(v: Value) -> Result<Option<Duration>, String> {
        match v {
            Value::Number(n) if n.as_u64() == Some(0) => Ok(None),
            Value::String(s) => duration_or_off_str(&s),
            _ => Err("must be a duration such as \"60s\", or \"off\"".into()),
        }
    }

    /// As [`duration_or_off`], from a command-line flag.
    pub fn duration_or_off_str(s: &str) -> Result<Option<Duration>, String> {
        if s == "off" || s == "0" {
            return Ok(None);
        }
        let d = humantime::parse_duration(s)
            .map_err(|e| format!("invalid duration {s:?}: {e} (or \"off\")"))?;
        Ok((!d.is_zero()).then_some(d))
    }

    pub fn socket_addr(v: Value) -> Result<SocketAddr, String> {
        let s = v
            .as_str()
            .ok_or("must be an address such as 127.0.0.1:5432")?;
        s.parse()
            .map_err(|_| format!("invalid address {s:?}: expected IP:PORT, e.g. 0.0.0.0:5433"))
    }

    pub fn string(v: Value) -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s),
            other => Err(format!("must be a string, found {other}")),
        }
    }

    pub fn bool(v: Value) -> Result<bool, String> {
        v.as_bool().ok_or_else(|| "must be true or false".into())
    }

    /// A list of CIDR blocks, checked like IP rules (no host bits set).
    pub fn cidr_list(v: Value) -> Result<Vec<ipnet::IpNet>, String> {
        let Value::Array(items) = v else {
            return Err("must be a list of CIDR blocks, e.g. [10.0.0.0/8]".into());
        };
        items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => crate::allowlist::parse_cidr(&s),
                other => Err(format!("must be a list of CIDR strings, found {other}")),
            })
            .collect()
    }

    pub fn positive_usize(v: Value) -> Result<usize, String> {
        match v.as_u64() {
            Some(n) if n > 0 => usize::try_from(n).map_err(|_| "is too large".to_string()),
            _ => Err("must be a positive integer".into()),
        }
    }

    pub fn positive_u32(v: Value) -> Result<u32, String> {
        match v.as_u64() {
            Some(n) if n > 0 => u32::try_from(n).map_err(|_| "is too large".to_string()),
            _ => Err("must be a positive integer".into()),
        }
    }
}

/// serde-saphyr has no ordered value tree; this keeps a mapping's entries in file order with
/// the key's position, which is all [`Fields`] needs.
mod indexmap_free {
    use std::fmt;

    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use serde_json::Value;
    use serde_saphyr::Spanned;

    pub struct OrderedMap(pub Vec<(Spanned<String>, Value)>);

    impl<'de> Deserialize<'de> for OrderedMap {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = OrderedMap;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a mapping of keys to values")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<OrderedMap, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry::<Spanned<String>, Value>()? {
                        out.push((k, v));
                    }
                    Ok(OrderedMap(out))
                }
            }
            d.deserialize_map(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_error_with_file_key_and_line() {
        let text = "a: 1\nbogus: true\nb: \"x\"\nc: nope\n";
        let mut f = Fields::parse(Path::new("/etc/p.yaml"), text).unwrap();
        let a: Option<u32> = f.required("a");
        let b: Option<u32> = f.required("b");
        let c = f.optional_with("c", convert::duration);
        let d: Option<u32> = f.required("d");
        assert_eq!((a, b, c, d), (Some(1), None, None, None));
        let errs = f.finish();
        let text = errs.to_string();
        assert_eq!(errs.0.len(), 4, "{text}");
        assert!(text.contains("/etc/p.yaml:3: b:"), "{text}");
        assert!(
            text.contains("/etc/p.yaml:4: c: invalid duration"),
            "{text}"
        );
        assert!(text.contains("/etc/p.yaml: d: is required"), "{text}");
        assert!(text.contains("/etc/p.yaml:2: bogus: unknown key"), "{text}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        for bad in ["a: [1, 2", "- a\n- b\n", "a: 1\na: 2\n", "\t- :"] {
            let err = match Fields::parse(Path::new("x.yaml"), bad) {
                Ok(f) => f.finish(),
                Err(e) => e,
            };
            assert!(!err.is_empty(), "{bad:?} parsed");
            assert!(err.to_string().starts_with("x.yaml"), "{err}");
        }
    }

    #[test]
    fn empty_file_is_an_empty_mapping() {
        let f = Fields::parse(Path::new("x.yaml"), "  \n").unwrap();
        assert!(f.finish().is_empty());
    }
}
