//! The operator's web surface, used as an operator and a monitoring system use it: a running
//! coordinator with two workers, its dashboard loaded in Debian's headless chromium (workers
//! table, loss chart, a screenshot kept under the test's folder), `/metrics` of the coordinator
//! and of a worker read by Prometheus's own text parser (Python `prometheus_client`) and matched
//! against `status.json`, `amity doctor` run against it, and the admin actions: refused without
//! the token, then pause, revoke (the revoked worker is turned away), a restart that keeps both,
//! and resume.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::cluster::{Cluster, cluster, free_port, interrupt, wait};
use crate::common::{http, python_venv, s};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// `/metrics` at `port`, parsed by `prometheus_client`: sample name -> [(labels, value)] (a
/// family without samples is there with none).
fn scrape(port: u16) -> Value {
    let (code, text) = http(port, "GET", "/metrics", None);
    assert_eq!(code, 200, "{text}");
    let python = python_venv("prometheus-parser", &["prometheus-client"]);
    let script = "import sys, json, math\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = {}\n\
        for fam in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   out.setdefault(fam.name + ('_total' if fam.type == 'counter' else ''), [])\n\
        \x20   for x in fam.samples:\n\
        \x20       v = None if math.isnan(x.value) else x.value\n\
        \x20       out.setdefault(x.name, []).append([x.labels, v])\n\
        print(json.dumps(out))\n";
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(m: &Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    m[name]
        .as_array()
        .unwrap_or_else(|| panic!("no {name} in {m}"))
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s[0][k] == *v))
        .and_then(|s| s[1].as_f64())
        .unwrap_or_else(|| panic!("no {name}{labels:?} in {m}"))
}

/// The live status from the dashboard's `/status.json`.
fn live(port: u16) -> Value {
    let (code, body) = http(port, "GET", "/status.json", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Runs chromium headless on `url` with `args` and returns its stdout. Chromium itself once
/// exited non-zero under CI load with nothing but D-Bus noise on stderr (and passed alone), so
/// a failed browser process is tried once more; what the page shows is checked by the caller.
fn chromium(dir: &Path, url: &str, args: &[&str]) -> String {
    let run = || {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--virtual-time-budget=10000",
            ])
            .arg(format!(
                "--user-data-dir={}",
                s(&dir.join("chromium-profile"))
            ))
            .args(args)
            .arg(url)
            .output()
            .expect("chromium (scripts/install-deps installs it)")
    };
    let first = run();
    let out = if first.status.success() {
        first
    } else {
        eprintln!(
            "chromium exited with {} on the first try; trying again",
            first.status
        );
        run()
    };
    assert!(
        out.status.success(),
        "chromium exited with {} twice: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dashboard as a browser shows it: two workers in the table, points on the loss chart.
fn the_browser_shows_workers_and_loss(c: &Cluster, web: u16) {
    let url = format!("http://127.0.0.1:{web}/");
    let dom = chromium(&c.dir, &url, &["--dump-dom"]);
    let table = dom
        .split("<table id=\"workers\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .expect("the workers table");
    for name in ["uni-a", "uni-b"] {
        assert!(table.contains(&format!("<td>{name}</td>")), "{table}");
    }
    assert_eq!(
        table.matches("<tr>").count(),
        3,
        "a header and two workers: {table}"
    );
    let chart = dom
        .split("<svg id=\"loss-chart\"")
        .nth(1)
        .and_then(|t| t.split("</svg>").next())
        .expect("the loss chart");
    assert!(chart.matches("class=\"point\"").count() >= 2, "{chart}");
    let shot = c.dir.join("dashboard.png");
    chromium(
        &c.dir,
        &url,
        &[
            &format!("--screenshot={}", s(&shot)),
            "--window-size=1400,1800",
        ],
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{}",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// `/metrics` of the coordinator agrees with the `status.json` it wrote (taken while paused, so
/// that neither moves), and a worker's with what it did.
fn metrics_match_the_status(c: &Cluster, web: u16) -> Value {
    let st = c.status().unwrap();
    let m = scrape(web);
    let history = st["history"].as_array().unwrap();
    assert_eq!(
        sample(&m, "amity_round", &[]),
        st["round"].as_f64().unwrap()
    );
    assert_eq!(
        sample(&m, "amity_rounds_closed_total", &[]),
        history.len() as f64
    );
    assert_eq!(sample(&m, "amity_paused", &[]), 1.0);
    for (dir, key) in [("up", "bytes_up"), ("down", "bytes_down")] {
        let sum: f64 = history.iter().map(|r| r[key].as_f64().unwrap()).sum();
        assert_eq!(
            sample(&m, "amity_bytes_sent_total", &[("direction", dir)]),
            sum
        );
    }
    for (inst, p) in st["provenance"].as_object().unwrap() {
        assert_eq!(
            sample(
                &m,
                "amity_updates_accepted_total",
                &[("institution", inst.as_str())]
            ),
            p["updates"].as_f64().unwrap()
        );
    }
    let workers = st["workers"].as_array().unwrap();
    assert_eq!(sample(&m, "amity_workers", &[]), workers.len() as f64);
    for w in workers {
        let id = w["id"].to_string();
        assert_eq!(
            sample(
                &m,
                "amity_worker_samples_per_second",
                &[
                    ("worker", &id),
                    ("institution", w["name"].as_str().unwrap())
                ]
            ),
            w["samples_per_s"].as_f64().unwrap()
        );
    }
    // Telemetry is measured after status.json is written: the live status has it.
    let last = live(web)["telemetry"].as_array().unwrap().last().cloned();
    if let Some(t) = last {
        assert_eq!(
            sample(&m, "amity_rankme", &[]),
            t["rankme"].as_f64().unwrap()
        );
        assert_eq!(
            sample(&m, "amity_rankme_centred", &[]),
            t["rankme_centred"].as_f64().unwrap()
        );
    }
    m
}

fn a_worker_reports_its_metrics(c: &Cluster, port: u16) -> Value {
    c.wait_for(
        "a round of uni-a's acknowledged",
        Duration::from_secs(120),
        || sample(&scrape(port), "amity_worker_rounds_total", &[]) >= 1.0,
    );
    let m = scrape(port);
    assert_eq!(sample(&m, "amity_worker_registered", &[]), 1.0);
    assert!(sample(&m, "amity_worker_samples_per_second", &[]) > 0.0);
    assert!(sample(&m, "amity_worker_rounds_total", &[]) >= 1.0);
    assert!(sample(&m, "amity_bytes_sent_total", &[("direction", "up")]) > 0.0);
    assert!(sample(&m, "amity_bytes_sent_total", &[("direction", "down")]) > 0.0);
    assert_eq!(sample(&m, "amity_worker_info", &[("backend", "flex")]), 1.0);
    m
}

/// `amity doctor` against the running coordinator, as uni-a would run it before joining.
fn the_doctor_reaches_the_coordinator(c: &Cluster) {
    let ca = c.dir.join("ca");
    let out = crate::common::amity(&[
        "doctor",
        "--coordinator",
        &format!("127.0.0.1:{}", c.port),
        "--cert",
        s(&ca.join("uni-a.crt")),
        "--ca",
        s(&ca.join("ca.crt")),
        "--cache",
        s(&c.dir.join("cache-doctor")),
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(text.trim()).unwrap();
    let verdict = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| {
                (
                    c["verdict"].as_str().unwrap().to_owned(),
                    c["detail"].to_string(),
                )
            })
            .unwrap_or_else(|| panic!("no {name} check in {report}"))
    };
    for name in [
        "backend flex",
        "certificate",
        "path MTU",
        "reachability",
        "clock offset",
        "memory",
        "disk",
    ] {
        let (v, detail) = verdict(name);
        assert_eq!(v, "pass", "{name}: {detail}");
    }
    // A certificate of another CA fails the certificate check and the exit status.
    let other = c.dir.join("other-ca");
    crate::common::ok(&crate::common::amity(&["ca", "init", "--dir", s(&other)]));
    let out = crate::common::amity(&[
        "doctor",
        "--cert",
        s(&ca.join("uni-a.crt")),
        "--key",
        s(&ca.join("uni-a.key")),
        "--ca",
        s(&other.join("ca.crt")),
        "--cache",
        s(&c.dir.join("cache-doctor")),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("FAIL  certificate"), "{text}");
}

#[test]
fn the_dashboard_metrics_and_admin_actions_work_for_an_operator() {
    let web = free_port();
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:{web}\"\nadmin_token_file = \"admin-token\"\n\
         telemetry_clips = 16\n"
    );
    let c = cluster("dashboard", &["uni-a", "uni-b"], 0, &extra);
    // Training goes on with one worker after uni-b is revoked, also after the restart.
    let config = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(
        &c.config,
        config.replace("min_workers = 2", "min_workers = 1"),
    )
    .unwrap();
    std::fs::write(c.dir.join("admin-token"), format!("{TOKEN}\n")).unwrap();
    let mut coord = c.coordinator(false);
    let (pa, pb) = (free_port(), free_port());
    let _a = c.worker("uni-a", &["--metrics-listen", &format!("127.0.0.1:{pa}")]);
    let mut b = c.worker("uni-b", &["--metrics-listen", &format!("127.0.0.1:{pb}")]);
    c.wait_rounds(2, Duration::from_secs(240));
    c.wait_for("both workers connected", Duration::from_secs(60), || {
        live(web)["workers"].as_array().unwrap().len() == 2
    });
    let worker_metrics = a_worker_reports_its_metrics(&c, pa);
    the_doctor_reaches_the_coordinator(&c);
    the_browser_shows_workers_and_loss(&c, web);

    // Admin actions need the token.
    assert_eq!(http(web, "POST", "/admin/pause", None).0, 401);
    assert_eq!(
        http(web, "POST", "/admin/pause", Some("wrong-token-0123456789")).0,
        401
    );
    let (code, said) = http(web, "POST", "/admin/pause", Some(TOKEN));
    assert_eq!(code, 200, "{said}");
    // The round under way closes; no other starts.
    c.wait_for("paused and idle", Duration::from_secs(120), || {
        c.status()
            .is_some_and(|s| s["operator"]["paused"] == true && s["running"] == false)
    });
    let closed = c.status().unwrap()["history"].as_array().unwrap().len();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(live(web)["history"].as_array().unwrap().len(), closed);
    assert_eq!(live(web)["running"], false);
    let coordinator_metrics = metrics_match_the_status(&c, web);
    let served: Vec<String> = [&worker_metrics, &coordinator_metrics]
        .iter()
        .flat_map(|m| m.as_object().unwrap().keys().cloned())
        .collect();
    the_grafana_dashboard_queries_only_served_metrics(&served);

    // Revoking uni-b ends its session; its worker is refused at the handshake from then on.
    let (code, said) = http(web, "POST", "/admin/revoke/uni-b", Some(TOKEN));
    assert_eq!(code, 200, "{said}");
    assert_eq!(http(web, "POST", "/admin/revoke/a%2Fb", Some(TOKEN)).0, 400);
    c.wait_for("uni-b gone", Duration::from_secs(60), || {
        let st = live(web);
        let names: Vec<&str> = st["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap())
            .collect();
        names == ["uni-a"]
    });

    // A restart keeps both decisions (the command log holds them).
    interrupt(&coord);
    wait(&mut coord, Duration::from_secs(30), "coordinator", &|| {
        c.log("coordinator")
    });
    let _coord = c.coordinator(false);
    c.wait_for("the dashboard back", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", web)).is_ok()
    });
    let st = live(web);
    assert_eq!(st["operator"]["paused"], true, "{}", st["operator"]);
    assert_eq!(st["operator"]["revoked"], serde_json::json!(["uni-b"]));
    // uni-b's worker gives up: its certificate is refused.
    let started = Instant::now();
    while b.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "uni-b still running:\n{}",
            c.log("uni-b")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!b.wait().unwrap().success());
    let said = c.log("uni-b");
    assert!(said.to_lowercase().contains("revoked"), "{said}");

    // Resumed, training goes on with uni-a alone.
    let (code, said) = http(web, "POST", "/admin/resume", Some(TOKEN));
    assert_eq!(code, 200, "{said}");
    c.wait_rounds(closed + 1, Duration::from_secs(180));
    let st = c.status().unwrap();
    let last = st["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["accepted"], serde_json::json!(["uni-a"]), "{last}");
}

/// Every metric the Grafana dashboard in `deploy/` queries is one the coordinator or a worker
/// serves (`served`: the metric names seen in their scrapes).
fn the_grafana_dashboard_queries_only_served_metrics(served: &[String]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/amity-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("amity_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.push(name);
            }
        }
    }
    assert!(queried.len() > 10, "{queried:?}");
    for name in queried {
        // Raft's metrics come from a replica only: this run has one coordinator.
        let raft = include_str!("../coordinator/src/server/http/metrics.rs");
        assert!(
            served.contains(&name) || (name.starts_with("amity_raft_") && raft.contains(&name)),
            "the dashboard queries {name}, which nobody serves"
        );
    }
}
