//! `amity coordinator members`: adds, removes or replaces a replica of a replicated
//! coordinator, one change at a time, as the operator (an operator certificate from
//! `amity ca issue --role operator`).
//!
//! Any replica may be asked: a follower names the leader (`ErrorCode::NotLeader`) and the
//! question goes there; a leader asked to remove itself hands leadership over first and names
//! the new leader. The answer comes once the change is committed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand};

use amity_protocol::message::{
    ClientMsg, CoordinatorStatus, ErrorCode, MembershipChange, ServerMsg,
};
use amity_protocol::tls::Identity;
use amity_worker::CoordinatorAddr;

use crate::status_cmd::{ConnectArgs, ask, ask_status};

/// `amity coordinator members`.
#[derive(Debug, Args)]
pub struct MembersArgs {
    /// Where and as whom (an operator certificate).
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The change.
    #[command(subcommand)]
    pub change: MembersCommand,
}

/// The replica to add.
#[derive(Debug, Clone, Args)]
pub struct NewReplica {
    /// Its Raft id (not 0, unused in the group).
    #[arg(long)]
    pub id: u64,
    /// The name on its replica certificate (`amity ca issue --role replica`).
    #[arg(long)]
    pub name: String,
    /// Where the other replicas reach it (its Raft port, `host:port`).
    #[arg(long)]
    pub peer: SocketAddr,
    /// Where workers reach it (`host:port`).
    #[arg(long)]
    pub workers: SocketAddr,
}

/// One membership change.
#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// Add a replica: first as a learner (it catches up from a snapshot without changing the
    /// quorum), then, once its log matches the leader's, as a voter. Start it first, with
    /// `join = true` in its `[replication]` table.
    Add {
        /// The replica to add.
        #[command(flatten)]
        new: NewReplica,
        /// How long it may take to catch up, in seconds.
        #[arg(long, default_value_t = 300)]
        catch_up_s: u64,
    },
    /// Remove a replica (when it leads, it hands over first). Stop its process afterwards.
    Remove {
        /// Its Raft id.
        #[arg(long)]
        id: u64,
    },
    /// Replace replica `--old` by a new one: add the new one (as `add` does), then remove the
    /// old one.
    Replace {
        /// The replica to retire.
        #[arg(long)]
        old: u64,
        /// The replica taking its place.
        #[command(flatten)]
        new: NewReplica,
        /// How long the new replica may take to catch up, in seconds.
        #[arg(long, default_value_t = 300)]
        catch_up_s: u64,
    },
}

/// Runs `amity coordinator members`.
pub fn members(args: MembersArgs) -> Result<()> {
    let (identity, targets) = args.connect.open()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match args.change {
            MembersCommand::Add { new, catch_up_s } => {
                add_voter(&identity, &targets, &new, catch_up_s).await?;
            }
            MembersCommand::Remove { id } => {
                remove(&identity, &targets, id).await?;
            }
            MembersCommand::Replace {
                old,
                new,
                catch_up_s,
            } => {
                add_voter(&identity, &targets, &new, catch_up_s).await?;
                remove(&identity, &targets, old).await?;
            }
        }
        Ok(())
    })
}

/// Adds `new` as a learner, waits until it caught up, then makes it a voter.
async fn add_voter(
    identity: &Identity,
    targets: &[CoordinatorAddr],
    new: &NewReplica,
    catch_up_s: u64,
) -> Result<()> {
    change(identity, targets, add(new)).await?;
    println!("replica {} added as a learner", new.id);
    caught_up(identity, targets, new.id, Duration::from_secs(catch_up_s)).await?;
    let s = change(identity, targets, MembershipChange::Promote { id: new.id }).await?;
    println!("replica {} votes: voters {:?}", new.id, voters(&s));
    Ok(())
}

async fn remove(identity: &Identity, targets: &[CoordinatorAddr], id: u64) -> Result<()> {
    let s = change(identity, targets, MembershipChange::Remove { id }).await?;
    println!(
        "replica {id} removed: voters {:?}; stop its process (its state dir is no longer needed)",
        voters(&s)
    );
    Ok(())
}

fn add(new: &NewReplica) -> MembershipChange {
    MembershipChange::Add {
        id: new.id,
        name: new.name.clone(),
        peer: new.peer.to_string(),
        workers: new.workers.to_string(),
    }
}

fn voters(s: &CoordinatorStatus) -> Vec<u64> {
    s.replica
        .as_ref()
        .map(|r| r.voters.clone())
        .unwrap_or_default()
}

/// How many replicas a change visits (following `NotLeader`) before giving up.
const MAX_HOPS: usize = 12;

/// Asks for `what`, following the replicas to the leader; returns the status once committed.
async fn change(
    identity: &Identity,
    targets: &[CoordinatorAddr],
    what: MembershipChange,
) -> Result<CoordinatorStatus> {
    let mut next = 0;
    let mut target = targets[0].clone();
    let mut last = String::new();
    for _ in 0..MAX_HOPS {
        let answer = ask(identity, &target, ClientMsg::ChangeMembership(what.clone())).await;
        match answer {
            Ok(ServerMsg::Status(s)) => return Ok(s),
            Ok(ServerMsg::Error {
                code: ErrorCode::NotLeader,
                message,
            }) if !message.is_empty() => {
                target = CoordinatorAddr::parse(&message, &target.name)
                    .map_err(|e| anyhow!("{target} named a leader `{message}`: {e}"))?;
                // A leader that just handed over: give the election a moment.
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Ok(ServerMsg::Error {
                code: ErrorCode::NotLeader,
                ..
            }) => last = format!("{target}: knows no leader"),
            Ok(ServerMsg::Error { code, message }) => bail!("{target}: {code:?}: {message}"),
            Ok(other) => bail!("{target}: expected a status, got {other:?}"),
            Err(e) => last = format!("{target}: {e:#}"),
        }
        eprintln!("{last}; trying another replica");
        next = (next + 1) % targets.len();
        target = targets[next].clone();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("no replica took the change ({last})")
}

/// Waits until the leader reports replica `id`'s log caught up (lag 0).
async fn caught_up(
    identity: &Identity,
    targets: &[CoordinatorAddr],
    id: u64,
    within: Duration,
) -> Result<()> {
    let start = Instant::now();
    let mut said = None;
    while start.elapsed() < within {
        for target in targets {
            let Ok(s) = ask_status(identity, target).await else {
                continue;
            };
            let lag = s.replica.as_ref().and_then(|r| {
                r.lag
                    .iter()
                    .find(|(of, _)| *of == id)
                    .map(|(_, behind)| *behind)
            });
            let Some(lag) = lag else {
                continue;
            };
            if lag == 0 {
                println!("replica {id} caught up");
                return Ok(());
            }
            if said != Some(lag) {
                println!("replica {id}: {lag} entries behind");
                said = Some(lag);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!(
        "replica {id} did not catch up within {within:?}: it stays a learner (no vote); check \
         it with `amity coordinator status`, then remove it (`members remove --id {id}`) or run \
         `add` again"
    )
}
