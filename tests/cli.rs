//! The `amity` binary as a user meets it: help, backends, and honest "not built yet" errors.

use crate::common::amity;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_subcommand_with_a_description() {
    let out = amity(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for sub in [
        "demo",
        "coordinator",
        "worker",
        "corpus",
        "train",
        "release",
        "fetch",
        "embed",
        "surprise",
        "plan",
        "bench",
        "ca",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{sub} ")))
            .unwrap_or_else(|| panic!("`{sub}` missing from --help:\n{help}"));
        assert!(
            line.split_whitespace().count() > 2,
            "`{sub}` has no description: {line}"
        );
    }
}

#[test]
fn worker_lists_compiled_backends() {
    let out = amity(&["worker", "--list-backends"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).lines().next(), Some("flex"));
}

#[test]
fn unknown_backend_is_a_clear_error() {
    let out = amity(&["worker", "--backend", "tpu"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("unknown backend `tpu`"), "{err}");
    assert!(err.contains("flex"), "{err}");
}

#[test]
fn a_bad_plan_sweep_point_is_refused_before_anything_runs() {
    let out = amity(&["bench", "plan", "--sweep", "96x3,96x0:mean"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("\"96x0:mean\"") && err.contains("SAMPLESxITERATIONS"),
        "{err}"
    );
    assert!(text(&out.stdout).is_empty(), "nothing ran");
}

#[test]
fn a_bad_bench_plan_flag_is_refused_before_anything_runs() {
    for (flag, value, says) in [
        ("--blur", "nan", "fraction of the token grid"),
        ("--blur", "-1", "fraction of the token grid"),
        ("--encoder-patch", "5", "must divide"),
        ("--metric", "l3", "expected `l1` or `l2`"),
        ("--episodes", "0", "at least 1"),
        ("--rollout-steps", "1", "not in 2..=8"),
        ("--energy-weight", "-1", "finite number, at least 0"),
        ("--energy-weight", "inf", "finite number, at least 0"),
    ] {
        let out = amity(&["bench", "plan", &format!("{flag}={value}")]);
        assert!(!out.status.success(), "{flag} {value}");
        let err = text(&out.stderr);
        assert!(
            err.contains(says) && err.contains(flag),
            "{flag} {value}: {err}"
        );
        assert!(text(&out.stdout).is_empty(), "{flag} {value}: nothing ran");
    }
}

#[test]
fn worker_without_a_coordinator_says_what_it_needs() {
    let out = amity(&["worker"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--coordinator") && err.contains("--cert"),
        "{err}"
    );
}

#[test]
fn coordinator_config_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("amity-cli-coord-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("coordinator.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nstate_dir = \"s\"\nca_dir = \"ca\"\ncodec = \"int4\"\n",
    )
    .unwrap();
    let out = amity(&["coordinator", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("coordinator.toml") && err.contains("int4"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ca_init_and_issue_write_certificates_and_refuse_mistakes() {
    let dir = std::env::temp_dir().join(format!("amity-cli-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let out = amity(&["ca", "init", "--dir", d, "--operator", "Test Consortium"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = amity(&["ca", "issue", "--dir", d, "--name", "uni-a"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in ["ca.crt", "ca.key", "uni-a.crt", "uni-a.key"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // The certificate loads and names its holder.
    let id = amity_protocol::tls::Identity::load_from_ca_dir(&dir, "uni-a").unwrap();
    assert_eq!(id.name, "uni-a");
    // Never overwrite a CA or a certificate; refuse names that cannot be identities.
    for args in [
        vec!["ca", "init", "--dir", d],
        vec!["ca", "issue", "--dir", d, "--name", "uni-a"],
        vec!["ca", "issue", "--dir", d, "--name", "../evil"],
    ] {
        let out = amity(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains("exists") || err.contains("not a usable name"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fetch_and_release_name_what_is_wrong() {
    let out = amity(&[
        "fetch",
        "/nonexistent/release",
        "--out",
        "/tmp/x",
        "--key",
        "00",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("not an Ed25519 public key") || err.contains("00"),
        "{err}"
    );
    let out = amity(&["release", "--name", "v1"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("say what to release"),
        "{}",
        text(&out.stderr)
    );
    let key = "11".repeat(32);
    let out = amity(&[
        "fetch",
        "no-such-dir-or-host",
        "--out",
        "/tmp/x",
        "--key",
        &key,
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("neither a release folder nor a coordinator address"),
        "{err}"
    );
}

/// `amity bench federated` through the real coordinator and worker cores, on a run small
/// enough for a test: it ends with its JSON line, writes its plot, and prints its own progress
/// lines without the libraries' INFO lines.
#[test]
fn the_federated_bench_runs_and_ends_with_its_json_line() {
    let dir = crate::common::scratch("bench-federated");
    let plot = dir.join("bench.png");
    let out = amity(&[
        "bench",
        "federated",
        "--workers",
        "2",
        "--steps",
        "4",
        "--local-steps",
        "2",
        "--seeds",
        "0",
        "--iid-only",
        "--skip-central",
        "--batch",
        "2",
        "--probe-videos",
        "20",
        "10",
        "--variant",
        "default",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(json["bench"], "federated", "{last}");
    assert_eq!(json["runs"].as_array().map(Vec::len), Some(1), "{last}");
    assert!(json["reduction"].as_f64().unwrap() > 1.0, "{last}");
    assert!(plot.exists());
    assert!(!stderr.contains(" INFO "), "{stderr}");
}

/// `amity bench scale` on a small federation: the real core closes every round with the
/// flipped updates rejected, holds no update in memory (its peak stays within a few model
/// states whatever the worker count), and ends with its JSON line.
#[test]
fn the_scale_bench_closes_its_rounds_and_ends_with_its_json_line() {
    let dir = crate::common::scratch("bench-scale");
    let out = amity(&[
        "bench",
        "scale",
        "--workers",
        "60",
        "--flipped",
        "3",
        "--scratch",
        dir.join("store").to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(json["bench"], "scale", "{last}");
    assert_eq!(json["workers"], 60, "{last}");
    for round in json["rounds"].as_array().expect("rounds") {
        assert_eq!(round["accepted"], 57, "{last}");
        assert_eq!(round["rejected"], 3, "{last}");
    }
    // 60 dense updates would be 60 model states; streamed, the round needs a few.
    let peak = json["peak_mem_ratio"].as_f64().unwrap();
    assert!(peak > 0.5 && peak < 10.0, "{last}");
    assert!(json["close_ms"].as_f64().unwrap() > 0.0, "{last}");
    assert!(!dir.join("store").exists(), "the bench removes its store");
}

/// `amity bench transfer` on a few MiB: every transport moves the bytes (our blob protocol
/// verifies and writes them), and the last line holds the figures the issue names.
#[test]
fn the_transfer_bench_moves_every_transport_and_ends_with_its_json_line() {
    let out = amity(&["bench", "transfer", "--mib", "8"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(json["bench"], "transfer", "{last}");
    for key in [
        "quic_gbps",
        "bare_quinn_gbps",
        "ratio_bare",
        "ratio",
        "tls_gbps",
        "tcp_gbps",
        "quic_cpu_s_per_gib",
        "bare_cpu_s_per_gib",
        "bare_to_file_gbps",
        "ratio_bare_to_file",
        "bare_to_file_cpu_s_per_gib",
    ] {
        let v = json[key].as_f64().unwrap_or(0.0);
        assert!(v > 0.0 && v.is_finite(), "{key} in {last}");
    }
    assert!(stderr.contains("our receiver per GiB"), "{stderr}");
}

/// `amity bench probe` on a two-step checkpoint: both readouts score the checkpoint and a random
/// encoder, and the last line holds the gaps; a checkpoint that is not there is named.
#[test]
fn the_probe_bench_reads_both_readouts_and_names_a_missing_checkpoint() {
    let dir = crate::common::scratch("bench-probe");
    let ckpt = crate::common::tiny_checkpoint(&dir);
    let probe = |path: &std::path::Path| {
        amity(&[
            "bench",
            "probe",
            "--checkpoint",
            path.to_str().unwrap(),
            "--probe-videos",
            "20",
            "10",
        ])
    };
    let out = probe(&ckpt);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(json["bench"], "probe", "{last}");
    let names: Vec<&str> = json["readouts"]
        .as_array()
        .expect("readouts")
        .iter()
        .filter_map(|r| r["readout"].as_str())
        .collect();
    assert_eq!(names, ["space_mean", "quadrants"], "{last}");
    for key in ["velocity_gap_space_mean", "velocity_gap_quadrants"] {
        assert!(
            json[key].as_f64().is_some_and(f64::is_finite),
            "{key}: {last}"
        );
    }
    let missing = dir.join("nothing.safetensors");
    let out = probe(&missing);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nothing.safetensors"),
        "{err}"
    );
}
