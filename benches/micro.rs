//! Micro-benchmarks of the per-connection hot path that runs before any crypto: the startup
//! packet parser and the allowlist lookup. Run with `cargo bench --bench micro`.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use pgmtls::allowlist::{parse_cidr, AllowRule, Allowlist, MAX_RULES};
use pgmtls::wire::frontend::{parse_header, parse_startup_body, StartupParams};

fn startup_packet() -> Vec<u8> {
    StartupParams {
        minor: 0,
        params: vec![
            ("user".into(), "app".into()),
            ("database".into(), "orders".into()),
            ("application_name".into(), "pgbench".into()),
            ("client_encoding".into(), "UTF8".into()),
        ],
    }
    .encode()
}

fn bench_wire(c: &mut Criterion) {
    let packet = startup_packet();
    let mut header = [0u8; 8];
    header.copy_from_slice(&packet[..8]);
    let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    c.bench_function("parse_header/ssl_request", |b| {
        b.iter(|| parse_header(black_box(ssl_request)))
    });
    c.bench_function("parse_startup/4_params", |b| {
        b.iter(|| {
            let h = parse_header(black_box(header));
            let body = parse_startup_body(0, black_box(&packet[8..]));
            (h, body)
        })
    });
}

fn full_allowlist() -> Allowlist {
    Allowlist::new(
        (0..MAX_RULES)
            .map(|i| AllowRule {
                id: format!("rule-{i}").into(),
                cidr: parse_cidr(&format!("10.{i}.0.0/16")).unwrap_or_default(),
            })
            .collect(),
    )
}

fn bench_allowlist(c: &mut Criterion) {
    let list = full_allowlist();
    let first: IpAddr = [10, 0, 1, 1].into();
    let last: IpAddr = [10, 59, 1, 1].into();
    let miss: IpAddr = [192, 0, 2, 1].into();
    let mapped: IpAddr = "::ffff:10.59.1.1".parse().unwrap_or(miss);
    c.bench_function("allowlist/60_rules/first_match", |b| {
        b.iter(|| list.check(black_box(first)).is_some())
    });
    c.bench_function("allowlist/60_rules/last_match", |b| {
        b.iter(|| list.check(black_box(last)).is_some())
    });
    c.bench_function("allowlist/60_rules/miss", |b| {
        b.iter(|| list.check(black_box(miss)).is_some())
    });
    c.bench_function("allowlist/60_rules/v4_mapped_v6", |b| {
        b.iter(|| list.check(black_box(mapped)).is_some())
    });
}

criterion_group!(benches, bench_wire, bench_allowlist);
criterion_main!(benches);
