//! `amity coordinator status`: asks running coordinators (or every replica of one) for their
//! state over the protocol, as a certificate holder. [`ask`] is the one way the CLI puts a
//! question to a running coordinator (`amity coordinator members` uses it too).

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use amity_protocol::conn::{MsgStream, hello};
use amity_protocol::message::{ClientMsg, CoordinatorStatus, ServerMsg};
use amity_protocol::tls::{Identity, quic_client_config};
use amity_worker::CoordinatorAddr;

use std::path::PathBuf;

use clap::Args;

use crate::ca_cmd::load_identity;

/// Where a running coordinator is and who asks it.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The coordinator's address, or every replica's, comma-separated (`host:port` or
    /// `name@host:port`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub coordinator: Vec<String>,
    /// Your certificate (an operator's or an institution's).
    #[arg(long)]
    pub cert: PathBuf,
    /// Its private key (default: the certificate's path with `.key`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The operator CA certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// The certificate name expected of addresses that name none.
    #[arg(long, default_value = "coordinator")]
    pub server_name: String,
}

impl ConnectArgs {
    /// The identity to ask with and the addresses to ask.
    pub fn open(&self) -> Result<(Identity, Vec<CoordinatorAddr>)> {
        let identity = load_identity(&self.cert, self.key.as_deref(), &self.ca)?;
        let targets = self
            .coordinator
            .iter()
            .map(|a| CoordinatorAddr::parse(a.trim(), &self.server_name))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| anyhow!("--coordinator {e}"))?;
        Ok((identity, targets))
    }
}

/// `amity coordinator status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Where and as whom.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print one JSON object per coordinator instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How long one coordinator may take to answer.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(25);

/// Asks each address in turn and prints what it says; fails when none answered.
pub fn status(args: StatusArgs) -> Result<()> {
    let (identity, targets) = args.connect.open()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut answered = 0;
    for target in &targets {
        let asked = rt.block_on(ask_status(&identity, target));
        match asked {
            Ok(s) => {
                answered += 1;
                if args.json {
                    println!("{}", as_json(target, &s));
                } else {
                    print!("{}", as_text(target, &s));
                }
            }
            Err(e) => eprintln!("{target}: {e:#}"),
        }
    }
    if answered == 0 {
        bail!("no coordinator answered");
    }
    Ok(())
}

/// One status question to `target`.
pub(crate) async fn ask_status(
    identity: &Identity,
    target: &CoordinatorAddr,
) -> Result<CoordinatorStatus> {
    match ask(identity, target, ClientMsg::StatusQuery).await? {
        ServerMsg::Status(s) => Ok(s),
        ServerMsg::Error { code, message } => bail!("{code:?}: {message}"),
        other => bail!("expected a status, got {other:?}"),
    }
}

/// Puts `question` to the coordinator at `target` and returns its answer (within
/// [`ANSWER_TIMEOUT`]).
pub(crate) async fn ask(
    identity: &Identity,
    target: &CoordinatorAddr,
    question: ClientMsg,
) -> Result<ServerMsg> {
    let asked = async {
        let cfg = quic_client_config(identity)?;
        let endpoint = amity_protocol::endpoint::client(target.addr, cfg)?;
        let conn = endpoint
            .connect(target.addr, &target.name)?
            .await
            .with_context(|| format!("connecting to {target}"))?;
        let (mut control, _) = hello(&conn, &target.name, "amity coordinator").await?;
        control.send(&question).await?;
        let answer = control.recv::<ServerMsg>().await?;
        let _ = control.send(&ClientMsg::Goodbye).await;
        finish(control, &conn).await;
        endpoint.wait_idle().await;
        answer.ok_or_else(|| anyhow!("{target} closed without answering"))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, asked)
        .await
        .map_err(|_| anyhow!("no answer within {ANSWER_TIMEOUT:?}"))?
}

async fn finish(mut control: MsgStream, conn: &quinn::Connection) {
    control.finish();
    conn.close(0u32.into(), b"done");
}

pub(crate) fn as_text(target: &CoordinatorAddr, s: &CoordinatorStatus) -> String {
    let mut out = format!(
        "{target}: round {} ({} closed{}), params {}, {} worker sessions\n",
        s.round,
        s.closed,
        if s.finished { ", finished" } else { "" },
        &s.params.to_hex()[..16],
        s.workers
    );
    if let Some(r) = &s.replica {
        let leader = match r.leader {
            0 => "none known".to_owned(),
            l if l == r.id => format!("{l} (this one)"),
            l => l.to_string(),
        };
        let learners = if r.learners.is_empty() {
            String::new()
        } else {
            format!(" (learners {:?})", r.learners)
        };
        out += &format!(
            "  replica {} of {:?}{learners}: term {}, leader {leader}, commit {}, applied {}\n",
            r.id, r.voters, r.term, r.commit, r.applied
        );
        if !r.lag.is_empty() {
            let lags: Vec<String> = r
                .lag
                .iter()
                .map(|(id, behind)| format!("replica {id} {behind} behind"))
                .collect();
            out += &format!("  lag: {}\n", lags.join(", "));
        }
    }
    out
}

fn as_json(target: &CoordinatorAddr, s: &CoordinatorStatus) -> serde_json::Value {
    json!({
        "coordinator": target.to_string(),
        "round": s.round,
        "closed": s.closed,
        "params": s.params.to_hex(),
        "finished": s.finished,
        "workers": s.workers,
        "replica": s.replica.as_ref().map(|r| json!({
            "id": r.id,
            "term": r.term,
            "leader": (r.leader != 0).then_some(r.leader),
            "commit": r.commit,
            "applied": r.applied,
            "voters": r.voters,
            "learners": r.learners,
            "lag": r.lag.iter().map(|(id, b)| (id.to_string(), json!(b))).collect::<serde_json::Map<_, _>>(),
        })),
    })
}
