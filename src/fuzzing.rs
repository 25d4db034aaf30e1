//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, one function per parser that a peer
//! or a file controls. They live in the library, not in the fuzz crate, so that
//! `tests/fuzz_corpus.rs` replays every committed corpus file through the same code on the
//! stable toolchain, without libFuzzer: a corpus input that once crashed fails `cargo test`.
//!
//! Each function takes arbitrary bytes and must return without panicking. Where a parser has
//! a writer, what parses is written back and parsed again, and the two readings must agree:
//! a writer that loses or changes what its own parser accepted is a bug the round trip finds.
//! Those checks are `assert!`s on purpose: a failed one is a crash the fuzzer reports.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::BytesMut;

use crate::conn::peer::{v1_source, v2_source};
use crate::fleet::message::{Reply, Request};
use crate::fleet::registry::ReplicaEntry;
use crate::wire::backend::{put_message, take_message, MAX_AUTH_PHASE_MESSAGE};
use crate::wire::frontend::{
    parse_cancel_body, parse_header, parse_startup_body, sasl_mechanism, PacketHeader,
};
use crate::wire::BackendMessage;

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/NAME.rs` and `fuzz/corpus/NAME/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("negotiation", negotiation),
    ("backend_messages", backend_messages),
    ("proxy_header", proxy_header),
    ("process_config", process_config),
    ("database_yaml", database_yaml),
    ("ip_rules", ip_rules),
    ("trusted_ips", trusted_ips),
    ("certificate_record", certificate_record),
    ("crl", crl),
    ("certificate", certificate),
    ("state_records", state_records),
    ("peer_message", peer_message),
    ("registry_entry", registry_entry),
];

/// What a client sends before TLS: the 8-byte header, then the body it announces (the
/// connection reads exactly `body_len` bytes after the header; an input with fewer is a
/// client that stalls, which the handshake deadline ends, not a parser's concern).
pub fn negotiation(data: &[u8]) {
    let Some((header, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    match parse_header(*header) {
        Ok(PacketHeader::Cancel { body_len }) => {
            let Some(body) = rest.get(..body_len) else {
                return;
            };
            if let Ok(key) = parse_cancel_body(body) {
                // The request the proxy forwards to Postgres carries the same bytes.
                assert_eq!(&key.to_request()[8..], body);
            }
        }
        Ok(PacketHeader::Startup { body_len, minor }) => {
            let Some(body) = rest.get(..body_len) else {
                return;
            };
            if let Ok(params) = parse_startup_body(minor, body) {
                let _ = (params.user(), params.database());
                // What the proxy sends upstream is what the client sent.
                let encoded = params.encode();
                assert_eq!(&encoded[8..], body);
                let mut h = [0u8; 8];
                h.copy_from_slice(&encoded[..8]);
                assert_eq!(
                    parse_header(h),
                    Ok(PacketHeader::Startup { body_len, minor })
                );
            }
        }
        Ok(PacketHeader::SslRequest | PacketHeader::GssEncRequest) | Err(_) => {}
    }
}

/// What Postgres sends during authentication, as the auth relay reads it: framed messages
/// taken one by one from a buffer, each parsed, re-framed as the relay forwards them.
pub fn backend_messages(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut framed = Vec::new();
    while let Ok(Some((tag, body))) = take_message(&mut buf, MAX_AUTH_PHASE_MESSAGE) {
        let _ = BackendMessage::parse(tag, &body);
        let _ = crate::wire::backend::error_field(&body, b'M');
        let _ = sasl_mechanism(&body);
        put_message(&mut framed, tag, &body);
    }
    // Forwarding re-frames exactly the bytes that were taken.
    assert_eq!(&framed[..], &data[..data.len() - buf.len()]);
}

/// The PROXY v1 line and the v2 binary header a trusted load balancer sends.
pub fn proxy_header(data: &[u8]) {
    let _ = v1_source(data);
    let _ = v2_source(data);
}

/// `pgmtls.yaml`.
pub fn process_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse(Path::new("/nonexistent/pgmtls.yaml"), text);
    }
}

/// `database.yaml`; what parses is written back by `to_yaml` and must read the same.
pub fn database_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("database.yaml");
    if let Ok(s) = crate::state::DatabaseSettings::parse(file, text) {
        let again = crate::state::DatabaseSettings::parse(file, &s.to_yaml());
        assert_eq!(again.as_ref().ok(), Some(&s), "{:?}", again.as_ref().err());
    }
}

/// `ip-rules.yaml`; round trip through `ip_rules_to_yaml`.
pub fn ip_rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("ip-rules.yaml");
    if let Ok(rules) = crate::state::parse_ip_rules(file, text) {
        let again = crate::state::parse_ip_rules(file, &crate::state::ip_rules_to_yaml(&rules));
        assert_eq!(
            again.as_ref().ok(),
            Some(&rules),
            "{:?}",
            again.as_ref().err()
        );
    }
}

/// `trusted-ips.yaml`; round trip through `trusted_ips_to_yaml`.
pub fn trusted_ips(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("trusted-ips.yaml");
    if let Ok(ranges) = crate::state::parse_trusted_ips(file, text) {
        let again =
            crate::state::parse_trusted_ips(file, &crate::state::trusted_ips_to_yaml(&ranges));
        assert_eq!(
            again.as_ref().ok(),
            Some(&ranges),
            "{:?}",
            again.as_ref().err()
        );
    }
}

/// `certificates/ID/certificate.yaml`; round trip through `to_yaml`.
pub fn certificate_record(data: &[u8]) {
    use crate::config::yaml::parse_doc;
    use crate::state::CertificateRecord;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("certificate.yaml");
    if let Ok(r) = parse_doc::<CertificateRecord>(file, text) {
        let again = parse_doc::<CertificateRecord>(file, &r.to_yaml());
        assert_eq!(again.as_ref().ok(), Some(&r), "{:?}", again.as_ref().err());
    }
}

/// `crl.pem`, as PEM text and as the DER inside it.
pub fn crl(data: &[u8]) {
    let _ = crate::pki::parse_crl_der(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::pki::parse_crl_pem(text);
    }
}

/// Certificate inspection (`server.crt`, `ca.crt`, client certificates), PEM and DER.
pub fn certificate(data: &[u8]) {
    let _ = crate::pki::inspect_cert_der(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::pki::inspect_cert_pem(text);
    }
}

/// Separates records in a `state_records` input: `KEY\nVALUE`, joined by this.
pub const RECORD_SEPARATOR: &[u8] = b"\n--record--\n";

/// A listing of etcd records (store keys under the prefix) loaded into databases, as a replica
/// does with what it reads from etcd. The input is records `KEY\nVALUE` joined by
/// [`RECORD_SEPARATOR`].
pub fn state_records(data: &[u8]) {
    let _ = crate::state::load_each_from_records("/pgmtls", &records_of(data));
}

/// The records of a `state_records` input.
pub fn records_of(data: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut records = BTreeMap::new();
    let mut rest = data;
    loop {
        let (chunk, tail) = match find(rest, RECORD_SEPARATOR) {
            Some(at) => (&rest[..at], Some(&rest[at + RECORD_SEPARATOR.len()..])),
            None => (rest, None),
        };
        let (key, value) = match chunk.iter().position(|&b| b == b'\n') {
            Some(at) => (&chunk[..at], &chunk[at + 1..]),
            None => (chunk, &[][..]),
        };
        records.insert(String::from_utf8_lossy(key).into_owned(), value.to_vec());
        match tail {
            Some(t) => rest = t,
            None => return records,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A peer-channel cancel request and its one-byte reply; round trip through `encode`.
pub fn peer_message(data: &[u8]) {
    let _ = Request::total_len(data);
    if let Ok(r) = Request::parse(data) {
        assert_eq!(r.encode(), data);
    }
    if let Some(&b) = data.first() {
        if let Ok(reply) = Reply::parse(b) {
            let _ = reply.as_str();
        }
    }
}

/// A replica's registry entry (JSON under `PREFIX/replicas/ID`); round trip through serde.
pub fn registry_entry(data: &[u8]) {
    if let Ok(e) = serde_json::from_slice::<ReplicaEntry>(data) {
        let _ = e.key();
        let json = serde_json::to_vec(&e).unwrap_or_default();
        let again = serde_json::from_slice::<ReplicaEntry>(&json);
        assert_eq!(again.as_ref().ok(), Some(&e), "{:?}", again.as_ref().err());
    }
}
