//! The `amity` binary as a user meets it: help, backends, and honest "not built yet" errors.

use std::process::{Command, Output};

fn amity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amity"))
        .args(args)
        .output()
        .expect("the amity binary runs")
}

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

/// Subcommands whose issue has not landed must say so and fail, never pretend to work.
/// Remove a name from this list when its implementation lands.
const NOT_BUILT: &[&str] = &[
    "demo",
    "coordinator",
    "release",
    "fetch",
    "embed",
    "surprise",
    "plan",
    "ca",
];

#[test]
fn unbuilt_subcommands_say_so_and_fail() {
    for sub in NOT_BUILT {
        let out = amity(&[sub]);
        assert!(!out.status.success(), "`amity {sub}` exited 0");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("`amity {sub}` is not built yet")),
            "`amity {sub}` stderr: {err}"
        );
    }
}
