//! Deployment files cannot rot: every YAML under deploy/ parses, the Kubernetes manifests agree
//! with the pgmtls config they embed (ports, probes, mount paths), and the systemd unit keeps
//! its hardening and its reload hook.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use pgmtls::config::Config;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_yaml_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&root(), &mut files);
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        assert!(!docs(&f).is_empty(), "{} is empty", f.display());
    }
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn check_manifest(name: &str) {
    let path = root().join("kubernetes").join(name);
    let docs = docs(&path);
    let cm = find(&docs, "ConfigMap")[0];
    let cfg_text = cm["data"]["pgmtls.yaml"].as_str().unwrap();
    let cfg = Config::parse(Path::new("pgmtls.yaml"), cfg_text)
        .unwrap_or_else(|e| panic!("{name}: embedded config: {e}"));
    let admin_port = cfg.admin_listen.expect("admin enabled for probes").port();
    // The admin port is open to the pod network for probes and scraping; /status is not.
    assert!(
        !cfg.admin_status_from.is_empty()
            && cfg
                .admin_status_from
                .iter()
                .all(|n| n.addr().is_loopback() && n.prefix_len() == n.max_prefix_len()),
        "{name}: admin_status_from must stay inside the pod: {:?}",
        cfg.admin_status_from
    );

    let deploy = find(&docs, "Deployment")[0];
    let pod = &deploy["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        admin_port.to_string(),
        "{name}: scrape port"
    );
    let containers = pod["spec"]["containers"].as_array().unwrap();
    let c = containers
        .iter()
        .find(|c| c["name"] == "pgmtls")
        .expect("a pgmtls container");
    let ports = c["ports"].as_array().unwrap();
    let port_of = |n: &str| {
        ports
            .iter()
            .find(|p| p["name"] == n)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{name}: no port named {n}"))
    };
    assert_eq!(
        port_of("admin"),
        u64::from(admin_port),
        "{name}: admin port"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    for probe in ["readinessProbe", "livenessProbe"] {
        let p = c[probe]["httpGet"]["port"].as_str().unwrap();
        port_of(p);
    }
    // The config the container reads is the ConfigMap's, and its state_dir is the Secret mount.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let cfg_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount_for = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {path}"))
    };
    mount_for(cfg_path);
    // With etcd: there is no state on disk (gateway_replicas_follow_the_etcd_of_etcd_yaml).
    if let Some(state_dir) = &cfg.state_dir {
        let state_mount = mount_for(state_dir.to_str().unwrap());
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        let state_vol = volumes
            .iter()
            .find(|v| v["name"] == state_mount["name"])
            .unwrap();
        assert!(
            state_vol["secret"]["defaultMode"].is_number(),
            "{name}: key mode"
        );
        let items = state_vol["secret"]["items"].as_array().unwrap();
        for f in [
            "database.yaml",
            "server.crt",
            "server.key",
            "ca.crt",
            "ip-rules.yaml",
        ] {
            assert!(
                items
                    .iter()
                    .any(|i| i["path"].as_str().unwrap().ends_with(&format!("/{f}"))),
                "{name}: state secret lacks {f}"
            );
        }
    }
    // The connection budgets fit the memory limit, at the measured costs (docs/CONFIG.md).
    let limit = c["resources"]["limits"]["memory"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: pgmtls has no memory limit"));
    let limit_kib: u64 = match limit.strip_suffix("Mi") {
        Some(n) => n.parse::<u64>().unwrap() * 1024,
        None => limit.strip_suffix("Gi").unwrap().parse::<u64>().unwrap() * 1024 * 1024,
    };
    let (at_rest, per_handshake, per_session) = (32 * 1024, 70, 12);
    let budget = at_rest
        + per_handshake * cfg.max_handshakes as u64
        + per_session * cfg.max_connections as u64;
    assert!(
        budget <= limit_kib,
        "{name}: budgets need {budget} KiB, memory limit is {limit}"
    );
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace > cfg.timeouts.shutdown_grace.as_secs(),
        "{name}: pod grace must exceed shutdown_grace"
    );
    for svc in find(&docs, "Service") {
        for p in svc["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            port_of(target);
            // Prometheus scrapes pods directly; no Service carries the admin port further.
            assert_ne!(target, "admin", "{name}: a Service exposes the admin port");
            assert_ne!(
                p["port"].as_u64(),
                Some(u64::from(admin_port)),
                "{name}: a Service exposes the admin port"
            );
        }
    }
}

#[test]
fn sidecar_manifest_matches_its_config() {
    check_manifest("sidecar.yaml");
}

#[test]
fn gateway_manifest_matches_its_config_and_keeps_client_ips() {
    check_manifest("gateway.yaml");
    let docs = docs(&root().join("kubernetes/gateway.yaml"));
    let svc = find(&docs, "Service")[0];
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(find(&docs, "Deployment")[0]["spec"]["replicas"], 3);
    assert_eq!(find(&docs, "PodDisruptionBudget").len(), 1);
}

#[test]
fn systemd_unit_is_hardened_and_reloads_with_sighup() {
    let unit = std::fs::read_to_string(root().join("systemd/pgmtls.service")).unwrap();
    let has = |line: &str| unit.lines().any(|l| l.trim() == line);
    for line in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "ReadWritePaths=/var/lib/pgmtls",
        "CapabilityBoundingSet=",
    ] {
        assert!(has(line), "pgmtls.service lacks {line:?}");
    }
}

#[test]
fn gateway_files_manifest_is_the_secret_publishing_fallback() {
    check_manifest("gateway-files.yaml");
    let docs = docs(&root().join("kubernetes/gateway-files.yaml"));
    let cm = find(&docs, "ConfigMap")[0];
    let cfg = Config::parse(
        Path::new("pgmtls.yaml"),
        cm["data"]["pgmtls.yaml"].as_str().unwrap(),
    )
    .unwrap();
    assert!(cfg.etcd.is_none() && cfg.state_dir.is_some());
    let svc = find(&docs, "Service")[0];
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(find(&docs, "Deployment")[0]["spec"]["replicas"], 3);
}

/// The command-line value of `--flag=VALUE` in a container's args.
fn flag<'a>(args: &'a [Value], flag: &str) -> &'a str {
    args.iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
        .unwrap_or_else(|| panic!("etcd.yaml: no --{flag}"))
}

#[test]
fn gateway_replicas_follow_the_etcd_of_etcd_yaml() {
    let gateway = docs(&root().join("kubernetes/gateway.yaml"));
    let cm = find(&gateway, "ConfigMap")[0];
    let cfg = Config::parse(
        Path::new("pgmtls.yaml"),
        cm["data"]["pgmtls.yaml"].as_str().unwrap(),
    )
    .unwrap_or_else(|e| panic!("gateway.yaml: embedded config: {e}"));
    // Every replica runs this one config: it names etcd and no state directory.
    let etcd = cfg
        .etcd
        .as_ref()
        .expect("gateway.yaml: the replicas follow etcd");
    assert!(cfg.state_dir.is_none(), "gateway.yaml: state_dir and etcd");
    let deploy = find(&gateway, "Deployment")[0];
    let pod = &deploy["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_array().unwrap();
    for c in pod["containers"].as_array().unwrap() {
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args.iter().position(|a| *a == "--config").unwrap();
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == args[at + 1])
            .expect("the config is mounted");
        let vol = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert_eq!(vol["configMap"]["name"], cm["metadata"]["name"]);
    }

    // The replica user of docs/etcd-roles.sh, its password from a Secret mounted read-only.
    let roles =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/etcd-roles.sh"))
            .unwrap();
    let user = etcd.user.as_deref().expect("gateway.yaml: an etcd user");
    assert_eq!(user, "pgmtls-replica");
    assert!(
        roles.contains(&format!("user add \"{user}:")),
        "etcd-roles.sh"
    );
    assert!(roles.contains(&format!(": \"${{PGMTLS_PREFIX:={}}}\"", etcd.prefix)));
    let password = etcd.password_file.as_ref().expect("a password_file");
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| password.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("nothing mounted at {}", password.display()));
    assert_eq!(mount["readOnly"], true);
    let vol = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
    let secret = &vol["secret"];
    // No other Secret: the state (and every key in it) comes from etcd, not from a volume.
    assert_eq!(
        volumes.iter().filter(|v| v["secret"].is_object()).count(),
        1,
        "gateway.yaml: replicas on etcd mount no published state"
    );
    assert!(
        secret["secretName"].is_string(),
        "the password comes from a Secret"
    );
    let rel = password
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap();
    assert!(
        secret["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| Path::new(i["path"].as_str().unwrap()) == rel),
        "the Secret has no item at {}",
        rel.display()
    );
    // The nonroot user reads the root-owned secret file through its group.
    assert!(pod["securityContext"]["fsGroup"].is_number());
    // The registry: a killed replica leaves `pgmtls fleet` within its TTL.
    assert!(etcd.registry_ttl.as_secs() >= 1);

    // The endpoints are the members etcd.yaml runs, at the Service's client port, and those
    // members form one cluster.
    let cluster = docs(&root().join("kubernetes/etcd.yaml"));
    let sts = find(&cluster, "StatefulSet")[0];
    let name = sts["metadata"]["name"].as_str().unwrap();
    let svc_name = sts["spec"]["serviceName"].as_str().unwrap();
    let svc = find(&cluster, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == svc_name)
        .expect("the StatefulSet's Service");
    assert_eq!(svc["spec"]["clusterIP"], "None", "a headless Service");
    let port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "client")
        .and_then(|p| p["port"].as_u64())
        .unwrap();
    let members = sts["spec"]["replicas"].as_u64().unwrap();
    let expected: Vec<String> = (0..members)
        .map(|i| format!("http://{name}-{i}.{svc_name}:{port}"))
        .collect();
    assert_eq!(etcd.endpoints, expected, "gateway.yaml's etcd endpoints");
    let args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    let initial: Vec<String> = (0..members)
        .map(|i| format!("{name}-{i}=http://{name}-{i}.{svc_name}:2380"))
        .collect();
    assert_eq!(flag(args, "initial-cluster"), initial.join(","));
    assert_eq!(
        flag(args, "advertise-client-urls"),
        format!("http://$(POD_NAME).{svc_name}:{port}")
    );
    // Only the gateway's pods (and the members) reach the client port.
    let policy = find(&cluster, "NetworkPolicy")[0];
    let gateway_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    assert!(
        policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .any(|rule| rule["from"][0]["podSelector"]["matchLabels"] == *gateway_labels),
        "etcd.yaml: the NetworkPolicy does not admit the gateway"
    );
    assert_eq!(find(&cluster, "PodDisruptionBudget").len(), 1);
}

/// `KEY=VALUE` lines of one section of a unit file, in order.
fn unit_section(unit: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for l in unit.lines().map(str::trim) {
        if l.starts_with('[') {
            inside = l == format!("[{section}]");
        } else if inside && !l.starts_with('#') {
            if let Some((k, v)) = l.split_once('=') {
                out.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    out
}

#[test]
fn renew_timer_runs_the_renew_service_daily_with_the_proxys_hardening() {
    let dir = root().join("systemd");
    let timer = std::fs::read_to_string(dir.join("pgmtls-renew.timer")).unwrap();
    let service = std::fs::read_to_string(dir.join("pgmtls-renew.service")).unwrap();
    let proxy = std::fs::read_to_string(dir.join("pgmtls.service")).unwrap();
    let t = unit_section(&timer, "Timer");
    let get = |kv: &[(String, String)], k: &str| {
        kv.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(get(&t, "Unit"), ["pgmtls-renew.service"]);
    assert_eq!(get(&t, "OnCalendar"), ["daily"]);
    assert_eq!(get(&t, "Persistent"), ["true"]);
    assert_eq!(get(&t, "RandomizedDelaySec").len(), 1);
    assert_eq!(
        get(&unit_section(&timer, "Install"), "WantedBy"),
        ["timers.target"]
    );

    let s = unit_section(&service, "Service");
    assert_eq!(get(&s, "Type"), ["oneshot"]);
    let exec = get(&s, "ExecStart");
    assert_eq!(exec.len(), 1);
    let words: Vec<&str> = exec[0].split_whitespace().collect();
    let proxy_exec = get(&unit_section(&proxy, "Service"), "ExecStart");
    let proxy_words: Vec<&str> = proxy_exec[0].split_whitespace().collect();
    // The same binary and the same config file as the proxy.
    assert_eq!(words[0], proxy_words[0]);
    assert_eq!(&words[1..3], ["certificates", "renew"]);
    let flag = |w: &[&str], f: &str| w.iter().position(|x| *x == f).map(|i| w[i + 1].to_owned());
    assert_eq!(flag(&words, "--config"), flag(&proxy_words, "--config"));
    assert!(flag(&words, "--notify-command").is_some(), "{words:?}");
    // The proxy's hardening and its user, line for line; only what a long-running service
    // needs differs.
    let service_only = [
        "Type",
        "ExecStart",
        "ExecReload",
        "KillSignal",
        "TimeoutStopSec",
        "Restart",
        "RestartSec",
        "LimitNOFILE",
    ];
    for kv in unit_section(&proxy, "Service") {
        if !service_only.contains(&kv.0.as_str()) {
            assert!(
                s.contains(&kv),
                "pgmtls-renew.service lacks {}={}",
                kv.0,
                kv.1
            );
        }
    }
    // One dynamic user name for both units, so renew's files are the proxy's.
    assert_eq!(get(&s, "User"), ["pgmtls"]);
    assert!(get(&unit_section(&proxy, "Service"), "User").is_empty());

    // systemd's own check, where it is installed; the binaries named must exist for it, so it
    // checks copies that name /bin/true.
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let tmp = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("pgmtls-renew.service", &service),
            ("pgmtls-renew.timer", &timer),
        ] {
            let text = text
                .replace("/usr/local/bin/pgmtls ", "/bin/true ")
                .replace("/usr/local/bin/pgmtls-notify", "/bin/true");
            std::fs::write(tmp.path().join(name), text).unwrap();
        }
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(tmp.path().join("pgmtls-renew.service"))
            .arg(tmp.path().join("pgmtls-renew.timer"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Only complaints about our two files count (the host's own units may be noisy).
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("pgmtls-renew"))
            .collect();
        assert!(ours.is_empty(), "systemd-analyze verify:\n{stderr}");
    }
}

/// The args of the container `name` of a pod spec.
fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .into_iter()
        .chain(pod["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn renew_cronjobs_run_renew_on_each_profiles_config_and_republish_its_secret() {
    let jobs = docs(&root().join("kubernetes/renew-cronjob.yaml"));
    let cronjobs = find(&jobs, "CronJob");
    let mut covered = Vec::new();
    for manifest in ["sidecar.yaml", "gateway-files.yaml"] {
        let m = docs(&root().join("kubernetes").join(manifest));
        let cm = find(&m, "ConfigMap")[0];
        let cm_name = cm["metadata"]["name"].as_str().unwrap();
        let cfg = Config::parse(
            Path::new("pgmtls.yaml"),
            cm["data"]["pgmtls.yaml"].as_str().unwrap(),
        )
        .unwrap();
        let state_dir = cfg.state_dir.unwrap().to_str().unwrap().to_owned();
        let pod = &find(&m, "Deployment")[0]["spec"]["template"]["spec"];
        let proxy = container(pod, "pgmtls");
        let proxy_args = strings(&proxy["args"]);
        let cfg_path = &proxy_args[proxy_args.iter().position(|a| a == "--config").unwrap() + 1];
        let secret = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["secret"].is_object())
            .unwrap()["secret"]
            .clone();

        // The CronJob that mounts this manifest's ConfigMap.
        let job = cronjobs
            .iter()
            .find(|j| {
                j["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["configMap"]["name"] == cm_name)
            })
            .unwrap_or_else(|| panic!("no renew CronJob uses {manifest}'s {cm_name}"));
        let name = job["metadata"]["name"].as_str().unwrap();
        covered.push(name.to_owned());
        assert_eq!(job["spec"]["concurrencyPolicy"], "Forbid", "{name}");
        let schedule: Vec<&str> = job["spec"]["schedule"]
            .as_str()
            .unwrap()
            .split(' ')
            .collect();
        assert_eq!(&schedule[2..], ["*", "*", "*"], "{name}: daily");
        assert!(schedule[..2].iter().all(|f| f.parse::<u32>().is_ok()));
        let jpod = &job["spec"]["jobTemplate"]["spec"]["template"]["spec"];

        // The same image, config file and state_dir as the proxy, running renew with a notify
        // command.
        let renew = container(jpod, "renew");
        assert_eq!(renew["image"], proxy["image"], "{name}");
        let args = strings(&renew["args"]);
        assert_eq!(&args[..2], ["certificates", "renew"], "{name}");
        let flag = |f: &str| {
            args.iter()
                .position(|a| a == f)
                .map(|i| args[i + 1].clone())
        };
        assert_eq!(
            flag("--config").as_deref(),
            Some(cfg_path.as_str()),
            "{name}"
        );
        assert!(flag("--notify-command").is_some(), "{name}");
        assert!(
            flag("--state-dir").is_none(),
            "{name}: the config names the state"
        );
        let mount = |c: &Value, path: &str| {
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == path)
                .unwrap_or_else(|| panic!("{name}: nothing at {path}"))
                .clone()
        };
        let cfg_mount = mount(renew, cfg_path);
        let cfg_vol = jpod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == cfg_mount["name"])
            .unwrap();
        assert_eq!(cfg_vol["configMap"]["name"], cm_name);
        // renew writes the state: a writable volume at the config's state_dir.
        let state_mount = mount(renew, &state_dir);
        assert_ne!(state_mount["readOnly"], true, "{name}");
        let state_vol = jpod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == state_mount["name"])
            .unwrap();
        assert!(state_vol["persistentVolumeClaim"]["claimName"].is_string());
        // --notify-command runs `sh -c`: something puts sh on the container's PATH.
        let path = renew["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "PATH")
            .unwrap()["value"]
            .as_str()
            .unwrap()
            .to_owned();
        let tools = path.split(':').find(|p| *p != "/usr/local/bin").unwrap();
        mount(renew, tools);
        let shell = strings(&container(jpod, "shell")["command"]).join(" ");
        assert!(shell.contains(&format!("{tools}/sh")), "{shell}");

        // It republishes the Secret the proxy mounts, every key at the path the proxy reads it
        // from, and renewal.yaml.
        let publish = strings(&container(jpod, "publish")["command"]).join(" ");
        let secret_name = secret["secretName"].as_str().unwrap();
        assert!(
            publish.contains(&format!("create secret generic {secret_name} ")),
            "{name}: {publish}"
        );
        mount(container(jpod, "publish"), &state_dir);
        let mut keys = vec![("renewal.yaml".to_owned(), "renewal.yaml".to_owned())];
        for i in secret["items"].as_array().unwrap() {
            keys.push((
                i["key"].as_str().unwrap().to_owned(),
                i["path"].as_str().unwrap().to_owned(),
            ));
        }
        for (key, path) in keys {
            let arg = format!("--from-file={key}={state_dir}/{path}");
            assert!(publish.contains(&arg), "{name}: publish lacks {arg}");
        }
    }
    // The sidecar's proxy reads the record from its Secret.
    let side = docs(&root().join("kubernetes/sidecar.yaml"));
    let items = find(&side, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"].is_object())
        .unwrap()["secret"]["items"]
        .clone();
    assert!(items
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["key"] == "renewal.yaml" && i["path"] == "renewal.yaml"));
    covered.sort();
    covered.dedup();
    assert_eq!(covered.len(), cronjobs.len(), "one CronJob per profile");
}
