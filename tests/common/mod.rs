//! Helpers the whole-system tests share: scratch folders and running the built binary.

pub mod cluster;
pub mod netns;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh, empty folder for test `name` of this process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("amity-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `amity` with `args` to completion.
pub fn amity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amity"))
        .args(args)
        .output()
        .expect("amity runs")
}

/// Asserts success and returns stdout and stderr together.
pub fn ok(o: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    text
}

/// A path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A checkpoint of the tiny preset after two training steps (`<dir>/train/`): a real model file
/// for tests that need one, not a trained one.
pub fn tiny_checkpoint(dir: &Path) -> PathBuf {
    let out = dir.join("train");
    ok(&amity(&[
        "train",
        "--steps",
        "2",
        "--batch",
        "2",
        "--no-probe",
        "--out",
        s(&out),
    ]));
    out.join("checkpoint.safetensors")
}

/// The Python of a virtual environment under the test target folder holding `packages` (from
/// PyPI), made on first use and kept between runs (`name` tells environments apart).
pub fn python_venv(name: &str, packages: &[&str]) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin/python");
    let imports: Vec<String> = packages.iter().map(|p| p.replace('-', "_")).collect();
    let ready = Command::new(&python)
        .args(["-c", &format!("import {}", imports.join(", "))])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv", s(&venv)])
            .output()
            .unwrap();
        assert!(made.status.success(), "python3 -m venv: {made:?}");
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(packages)
            .output()
            .unwrap();
        assert!(
            pip.status.success(),
            "pip install {packages:?}: {}",
            String::from_utf8_lossy(&pip.stderr)
        );
    }
    python
}

/// One HTTP/1.1 request to `127.0.0.1:port`; returns the status code and the body.
pub fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    try_http(port, method, path, token)
        .unwrap_or_else(|e| panic!("{method} http://127.0.0.1:{port}{path}: {e}"))
}

/// [`http`], or why no answer came (nothing listening yet, the connection closed early).
pub fn try_http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let bad = || std::io::Error::other(format!("not an HTTP answer: {raw:?}"));
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, body.to_owned()))
}
