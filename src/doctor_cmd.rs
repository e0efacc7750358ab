//! `amity doctor`: what an institution runs before it joins. Each check prints `PASS`, `WARN` or
//! `FAIL` with what it measured and, when it is not a pass, the fix. The exit status is 1 when a
//! check failed (a warning still lets the worker run, slower or with less margin).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;

use amity_protocol::conn::{hello, unix_ms};
use amity_protocol::endpoint::{SOCKET_BUFFER, granted_buffers};
use amity_protocol::tls::{Identity, cert_role, cert_validity, issued_by, quic_client_config};
use amity_shared::config::Config;
use amity_shared::device::Backend;
use amity_worker::CoordinatorAddr;

/// `amity doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The coordinator to check against (`host:port` or `name@host:port`); without it the
    /// network checks are skipped.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Your institution's certificate (from the operator's `amity ca issue`).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Its private key (default: the certificate's path with `.key`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The operator CA certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The certificate name expected of a coordinator address that names none.
    #[arg(long, default_value = "coordinator")]
    pub server_name: String,
    /// The run's preset, for the speed, memory and disk checks.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Backends to check (default: every one compiled into this binary).
    #[arg(long, value_delimiter = ',')]
    pub backend: Vec<String>,
    /// The worker's cache folder (its disk is checked).
    #[arg(long, default_value = "amity-worker-cache")]
    pub cache: PathBuf,
    /// Print one JSON object (every check) instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Pass,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Debug, serde::Serialize)]
struct Check {
    name: String,
    verdict: Verdict,
    detail: String,
    /// What to do about a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn check(name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        verdict,
        detail: detail.into(),
        fix: None,
    }
}

impl Check {
    fn fix(mut self, fix: impl Into<String>) -> Self {
        if self.verdict != Verdict::Pass {
            self.fix = Some(fix.into());
        }
        self
    }
}

/// Runs every check and prints them.
pub fn doctor(args: DoctorArgs) -> Result<()> {
    let run = Config::preset(&args.preset)?;
    let mut checks = Vec::new();
    checks.extend(backends(&args, &run)?);
    checks.push(memory(&run));
    checks.push(disk(&args.cache, &run));
    checks.push(udp_buffers());
    let identity = certificate(&args, &mut checks);
    match &args.coordinator {
        Some(addr) => {
            let target = CoordinatorAddr::parse(addr.trim(), &args.server_name)
                .map_err(|e| anyhow::anyhow!("--coordinator {e}"))?;
            checks.push(mtu(&target));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let ca = args.ca.as_deref();
            checks.extend(rt.block_on(reach(&target, identity.as_ref(), ca)));
        }
        None => checks.push(
            check(
                "coordinator",
                Verdict::Warn,
                "not checked (path MTU, reachability, round trip, clock offset)",
            )
            .fix("give --coordinator host:port (and --cert, --key, --ca)"),
        ),
    }
    let worst = checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Pass);
    if args.json {
        println!("{}", json!({ "checks": checks, "verdict": worst }));
    } else {
        for c in &checks {
            let tag = match c.verdict {
                Verdict::Pass => "PASS",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
            };
            println!("{tag}  {}: {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("      fix: {fix}");
            }
        }
    }
    if worst == Verdict::Fail {
        bail!("some checks failed: fix them before joining");
    }
    Ok(())
}

/// Each backend asked for: does its device compute, and how fast does it train the preset.
fn backends(args: &DoctorArgs, run: &Config) -> Result<Vec<Check>> {
    let list = if args.backend.is_empty() {
        Backend::compiled()
    } else {
        args.backend
            .iter()
            .map(|b| Backend::parse_available(b.trim()))
            .collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    for backend in list {
        let name = format!("backend {}", backend.name());
        let device = match backend.device(0) {
            Ok(d) => d,
            Err(e) => {
                out.push(
                    check(name, Verdict::Fail, format!("{e}"))
                        .fix("install the vendor driver, or run the worker with --backend flex"),
                );
                continue;
            }
        };
        let began = Instant::now();
        let rate = amity_worker::run::measure_throughput(run, &device, 1.0);
        let secs = began.elapsed().as_secs_f64();
        let detail = format!(
            "computes; trains the {} preset at {rate:.2} clips/s (measured over {secs:.1} s)",
            args.preset
        );
        let verdict = if rate.is_finite() && rate > 0.0 {
            Verdict::Pass
        } else {
            Verdict::Fail
        };
        out.push(check(name, verdict, detail).fix("the device computed nothing: check its driver"));
    }
    Ok(out)
}

/// Bytes of one copy of the run's trainable state (model and target encoder, fp32).
fn state_bytes(run: &Config) -> u64 {
    let (model, target) = amity_shared::checkpoint::layouts(run);
    (model.total + target.total) as u64 * 4
}

/// A `/proc/meminfo` or `/proc/self/status` field, in bytes.
fn proc_kib(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory: what training the preset took here (peak resident set while the speed was
/// measured, scaled to the run's batch) against what is available.
fn memory(run: &Config) -> Check {
    let (Some(available), Some(peak)) = (
        proc_kib("/proc/meminfo", "MemAvailable:"),
        proc_kib("/proc/self/status", "VmHWM:"),
    ) else {
        return check("memory", Verdict::Warn, "cannot read /proc (not Linux?)")
            .fix("check by hand that a few GiB are free for the worker");
    };
    let measured_batch = run.train.batch.clamp(1, 8);
    let scale = (run.train.batch as f64 / measured_batch as f64).max(1.0);
    let need = (peak as f64 * scale) as u64 + 8 * state_bytes(run);
    let detail = format!(
        "{} available; training needs about {} (peak {} at batch {measured_batch}, scaled to \
         the run's batch {}, plus the state copies a worker holds)",
        amity_worker::human(available),
        amity_worker::human(need),
        amity_worker::human(peak),
        run.train.batch
    );
    let verdict = if available >= need * 2 {
        Verdict::Pass
    } else if available >= need {
        Verdict::Warn
    } else {
        Verdict::Fail
    };
    check("memory", verdict, detail)
        .fix("stop other jobs, or run the worker where more memory is free")
}

/// Free bytes on the file system holding `dir` (or its nearest existing parent).
fn free_disk(dir: &Path) -> Option<u64> {
    let mut at = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    while !at.exists() {
        at = at.parent().filter(|p| !p.as_os_str().is_empty())?;
    }
    let path = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct it is given from a NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Disk: the cache holds two rounds of states, deltas and updates, plus the shards assigned.
fn disk(cache: &Path, run: &Config) -> Check {
    let Some(free) = free_disk(cache) else {
        return check(
            "disk",
            Verdict::Warn,
            format!("cannot stat {}", cache.display()),
        )
        .fix("check by hand that the cache folder's disk has a few GiB free");
    };
    let need = 8 * state_bytes(run) + (1 << 30);
    let detail = format!(
        "{} free at {}; the worker's cache needs about {} (8 copies of the {} state, 1 GiB of \
         shards)",
        amity_worker::human(free),
        cache.display(),
        amity_worker::human(need),
        amity_worker::human(state_bytes(run))
    );
    let verdict = if free >= need * 2 {
        Verdict::Pass
    } else if free >= need {
        Verdict::Warn
    } else {
        Verdict::Fail
    };
    check("disk", verdict, detail).fix("point --cache at a disk with more room")
}

/// UDP buffers: QUIC asks for [`SOCKET_BUFFER`]; Linux grants at most `net.core.rmem_max`.
fn udp_buffers() -> Check {
    let (recv, send) = match granted_buffers() {
        Ok(g) => g,
        Err(e) => return check("UDP buffers", Verdict::Fail, format!("no UDP socket: {e}")),
    };
    let detail = format!(
        "granted {} receive, {} send of the {} asked for",
        mib(recv),
        mib(send),
        mib(SOCKET_BUFFER)
    );
    let verdict = if recv >= SOCKET_BUFFER && send >= SOCKET_BUFFER {
        Verdict::Pass
    } else {
        Verdict::Warn
    };
    check("UDP buffers", verdict, detail).fix(format!(
        "transfers drop packets and slow down: sudo sysctl -w net.core.rmem_max={SOCKET_BUFFER} \
         net.core.wmem_max={SOCKET_BUFFER}, and keep it in /etc/sysctl.d/90-amity.conf"
    ))
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The certificate: readable, issued by the CA, valid now and for a while yet.
fn certificate(args: &DoctorArgs, checks: &mut Vec<Check>) -> Option<Identity> {
    let (Some(cert), Some(ca)) = (&args.cert, &args.ca) else {
        checks.push(
            check("certificate", Verdict::Warn, "not checked")
                .fix("give --cert and --ca (the files the operator sent you)"),
        );
        return None;
    };
    let identity = match crate::ca_cmd::load_identity(cert, args.key.as_deref(), ca) {
        Ok(i) => i,
        Err(e) => {
            checks.push(
                check("certificate", Verdict::Fail, format!("{e}"))
                    .fix("ask the operator for your certificate, key and the CA certificate"),
            );
            return None;
        }
    };
    let leaf = &identity.chain[0];
    let now = (unix_ms() / 1000) as i64;
    let role = format!("{:?}", cert_role(leaf)).to_lowercase();
    let (verdict, detail, fix) = match cert_validity(leaf) {
        _ if !issued_by(leaf, &identity.ca) => (
            Verdict::Fail,
            format!(
                "`{}` is not issued by the CA in {}",
                identity.name,
                ca.display()
            ),
            "use the CA certificate of the operator who issued yours",
        ),
        None => (
            Verdict::Fail,
            "cannot read its validity".into(),
            "ask for a new one",
        ),
        Some((from, _)) if now < from => (
            Verdict::Fail,
            format!(
                "`{}` is not valid for another {} s",
                identity.name,
                from - now
            ),
            "check this machine's clock (see the clock check)",
        ),
        Some((_, until)) if now > until => (
            Verdict::Fail,
            format!(
                "`{}` expired {} days ago",
                identity.name,
                (now - until) / 86_400
            ),
            "ask the operator to issue a new certificate",
        ),
        Some((_, until)) => {
            let days = (until - now) / 86_400;
            let v = if days < 30 {
                Verdict::Warn
            } else {
                Verdict::Pass
            };
            (
                v,
                format!("`{}` ({role}) valid for {days} more days", identity.name),
                "ask the operator for a new certificate before it expires",
            )
        }
    };
    checks.push(check("certificate", verdict, detail).fix(fix));
    Some(identity)
}

/// The path MTU towards the coordinator, as the kernel knows it.
fn mtu(target: &CoordinatorAddr) -> Check {
    #[cfg(target_os = "linux")]
    let measured = amity_protocol::endpoint::path_mtu(target.addr);
    #[cfg(not(target_os = "linux"))]
    let measured: std::io::Result<u32> = Err(std::io::Error::other("only measured on Linux"));
    match measured {
        Ok(m) if m >= 1500 => check("path MTU", Verdict::Pass, format!("{m} bytes to {target}")),
        Ok(m) if m >= 1280 => check(
            "path MTU",
            Verdict::Warn,
            format!("{m} bytes to {target}: QUIC works, with smaller packets (a tunnel?)"),
        )
        .fix("raise the interface or tunnel MTU to 1500 if the network allows"),
        Ok(m) => check(
            "path MTU",
            Verdict::Fail,
            format!("{m} bytes to {target}: QUIC needs 1280"),
        )
        .fix("raise the interface or tunnel MTU to at least 1280"),
        Err(e) => check("path MTU", Verdict::Warn, format!("not measured: {e}")),
    }
}

/// Reachability over QUIC, round trip and clock offset, from a `Hello`.
async fn reach(
    target: &CoordinatorAddr,
    identity: Option<&Identity>,
    ca: Option<&Path>,
) -> Vec<Check> {
    let attempt = async {
        let cfg = match identity {
            Some(id) => quic_client_config(id)?,
            // Without a certificate: reachability only (the server is checked against the CA
            // when one is given).
            None => amity_protocol::tls::quic_anonymous_client_config(ca)?,
        };
        let endpoint = amity_protocol::endpoint::client(target.addr, cfg)?;
        let conn = endpoint.connect(target.addr, &target.name)?.await?;
        let sent = unix_ms();
        let asked = Instant::now();
        let (mut control, welcome) = hello(&conn, &target.name, "amity doctor").await?;
        let hello_rtt = asked.elapsed();
        let received = unix_ms();
        let rtt = conn.rtt();
        control.finish();
        conn.close(0u32.into(), b"doctor done");
        endpoint.wait_idle().await;
        anyhow::Ok((welcome, rtt, hello_rtt, sent, received))
    };
    let outcome = tokio::time::timeout(Duration::from_secs(15), attempt).await;
    let (welcome, rtt, hello_rtt, sent, received) = match outcome {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return vec![
                check("reachability", Verdict::Fail, format!("{target}: {e:#}")).fix(
                    "check the address, that UDP to its port is open in every firewall on the \
                     way, and that your certificate is the operator's",
                ),
            ];
        }
        Err(_) => {
            return vec![
                check(
                    "reachability",
                    Verdict::Fail,
                    format!("{target}: no QUIC handshake within 15 s"),
                )
                .fix("UDP to the coordinator's port is blocked on the way, or it is down"),
            ];
        }
    };
    let mut out = vec![check(
        "reachability",
        Verdict::Pass,
        format!(
            "{target} answered over QUIC as `{}`; round trip {:.1} ms (Hello {:.1} ms)",
            welcome.identity,
            rtt.as_secs_f64() * 1e3,
            hello_rtt.as_secs_f64() * 1e3
        ),
    )];
    // The server read its clock between our send and our receipt.
    let midpoint = (sent + received) as i64 / 2;
    let offset = welcome.time_ms as i64 - midpoint;
    let bound = (received - sent) as i64 / 2;
    let verdict = match offset.unsigned_abs().saturating_sub(bound as u64) {
        0..=500 => Verdict::Pass,
        501..=30_000 => Verdict::Warn,
        _ => Verdict::Fail,
    };
    out.push(
        check(
            "clock offset",
            verdict,
            format!("the coordinator's clock is {offset:+} ms from this one's (+/- {bound} ms)"),
        )
        .fix("synchronise this machine's clock (chrony or systemd-timesyncd with NTP)"),
    );
    out
}
