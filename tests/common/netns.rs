//! A network namespace joined to the host by a veth pair, for faults loopback cannot show: a
//! link that drops every packet (no FIN, no RST, no ICMP), or one that loses some. Made by the
//! test (`ip netns add`, `ip link add ... type veth`, a private /30), removed on drop, also
//! when the test panics. [`NsForwarder`] runs a real HAProxy in TCP mode inside the namespace,
//! so a peer in the host is reached across the pair.
//!
//! Packets are dropped by iptables inside the namespace (all of them, or a random share with
//! the `statistic` match): the kernel here is built without `sch_netem`, so `tc netem` is not
//! there to use. Needs root and iproute2 ([`netns_available_or_skip`] says what is missing
//! otherwise), iptables and HAProxy, which `.ci/run` installs.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::haproxy::HAPROXY;
use super::pg::effective_uid;

/// Whether the namespace tests can run here; prints what is missing when not.
pub fn netns_available_or_skip() -> bool {
    if effective_uid() != 0 {
        eprintln!("SKIP: needs root for a network namespace (CI runs these as root)");
        return false;
    }
    if !works("ip", "-V") {
        eprintln!("SKIP: iproute2 `ip` not found");
        return false;
    }
    // CI installs both (.ci/run); a missing one there must fail, not skip.
    assert!(
        works("iptables", "-V"),
        "iptables not found: install it (apt-get install iptables)"
    );
    assert!(
        Path::new(HAPROXY).exists(),
        "{HAPROXY} not found: install HAProxy (apt-get install haproxy)"
    );
    true
}

fn works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One namespace, one veth pair: `host_if` (address `host_ip`) stays in the host, `ns_if`
/// (`ns_ip`) is inside.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl Netns {
    pub fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", pid % 100_000, n);
        // 198.19.0.0/16, the upper half of the benchmarking block 198.18.0.0/15, exists only
        // inside the pair (tests/keepalive.rs takes the lower half). Each run and test gets its
        // own /30 so parallel runs do not meet.
        let block = (pid.wrapping_mul(31).wrapping_add(n)) % 16_384;
        let (o3, o4) = (block / 64, (block % 64) * 4);
        let ns = Netns {
            name: format!("pgmtls-fn-{tag}"),
            host_if: format!("pf{tag}h"),
            ns_if: format!("pf{tag}c"),
            host_ip: format!("198.19.{o3}.{}", o4 + 1),
            ns_ip: format!("198.19.{o3}.{}", o4 + 2),
        };
        run_ok("ip", &["netns", "add", &ns.name]);
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.ns_if,
                "netns",
                &ns.name,
            ],
        );
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        run_ok("ip", &["addr", "add", &host_cidr, "dev", &ns.host_if]);
        run_ok("ip", &["link", "set", &ns.host_if, "up"]);
        run_ok(
            "ip",
            &["-n", &ns.name, "addr", "add", &ns_cidr, "dev", &ns.ns_if],
        );
        run_ok("ip", &["-n", &ns.name, "link", "set", &ns.ns_if, "up"]);
        run_ok("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn iptables(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, "iptables", "-w"];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }

    /// Every packet into or out of the namespace across the pair is dropped from now on: no
    /// FIN, no RST, no ICMP, as when a host or its link dies.
    pub fn drop_all(&self) {
        self.lose_share("1");
    }

    /// Each packet into or out of the namespace across the pair is dropped with probability
    /// `p` (e.g. "0.05"), independently.
    pub fn lose_share(&self, p: &str) {
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            self.iptables(&[
                "-A",
                chain,
                dir,
                &self.ns_if,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                p,
                "-j",
                "DROP",
            ]);
        }
    }

    /// Takes the drop rules away again.
    pub fn clear(&self) {
        self.iptables(&["-F", "INPUT"]);
        self.iptables(&["-F", "OUTPUT"]);
    }

    /// Packets the drop rules dropped so far (their counters in `iptables -L -v -x`).
    pub fn dropped(&self) -> u64 {
        ["INPUT", "OUTPUT"]
            .iter()
            .map(|chain| {
                let text = self.iptables(&["-L", chain, "-v", "-n", "-x"]);
                text.lines()
                    .filter(|l| l.contains("DROP") && !l.starts_with("Chain"))
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair and with it the host's end.
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

/// A real HAProxy in TCP mode inside a namespace, listening on `ns_ip:15432` and forwarding
/// every connection unchanged (no PROXY header) to `target`, a peer reached across the pair.
pub struct NsForwarder {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl NsForwarder {
    pub fn start(ns: &Netns, target: SocketAddr) -> NsForwarder {
        let dir = tempfile::Builder::new()
            .prefix("pgmtls-nsfwd-")
            .tempdir()
            .unwrap();
        // The namespace is new and empty, so a fixed port cannot be taken.
        let addr: SocketAddr = format!("{}:15432", ns.ns_ip).parse().unwrap();
        // Long client/server timeouts: the tests decide when a session ends, not HAProxy.
        let cfg = format!(
            "global\n  maxconn 2048\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 10m\n  timeout server 10m\n\nfrontend f\n  bind {addr}\n  \
             default_backend b\n\nbackend b\n  server s {target}\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        // `ip netns exec` execs the program in place, so the child's pid is HAProxy's.
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, HAPROXY, "-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn HAProxy in the namespace");
        // HAProxy prints nothing on a good start in the foreground: its listening socket is
        // the signal; poll it across the pair.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("HAProxy in {} exited with {status}", ns.name);
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy never accepted on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NsForwarder {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for NsForwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy's established TCP sockets as `ss -tnpo` prints them (one line each), so a test
/// can see the kernel's keepalive timer on each: `timer:(keepalive,...)`.
pub fn established_sockets_of(pid: u32) -> Vec<String> {
    let out = run_ok("ss", &["-tnpoH", "state", "established"]);
    let tag = format!("pid={pid},");
    out.lines()
        .filter(|l| l.contains(&tag))
        .map(str::to_owned)
        .collect()
}
