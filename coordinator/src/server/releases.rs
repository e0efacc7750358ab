//! Releases of a replicated coordinator: one set for the whole group, in the Raft log.
//!
//! The operator publishes a release on any replica (`amity release --config`, which writes a
//! signed folder into that replica's state). The replica finds it in its release index and
//! proposes a [`ReleaseRecord`] (a follower's proposal goes to the leader); once committed,
//! every replica that does not hold it copies it, verified, from the replica that proposed it
//! (else from any other), over the same QUIC path and checks as `amity fetch`. A release query
//! asked of any replica is a linearizable read: after its read index, it is answered from the
//! committed records, once the release named is here to be served (or an error after
//! [`COPY_WAIT_MS`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use amity_protocol::message::{ErrorCode, MAX_STRING, ServerMsg, brief};
use amity_release::fetch::{QuicSource, fetch_quic};
use amity_release::known::Trust;
use amity_release::sign::PublicKey;
use tokio::sync::mpsc;

use crate::config::ReplicaEntry;
use crate::release;
use crate::replica::{MachineAction, ReleaseRecord, ReplicaError, ReplicatedCore};

use super::shared::Shared;

/// How long a release found here waits before it is proposed again when it is not committed.
const PROPOSE_AGAIN_MS: u64 = 5_000;
/// How long a failed copy waits before it is tried again.
const COPY_AGAIN_MS: u64 = 2_000;
/// How long a release query waits for the release it names to be copied here.
pub(super) const COPY_WAIT_MS: u64 = 10_000;

/// A copy that finished: the release's name and whether it worked.
type Copied = (String, Result<(), String>);

/// The group's releases as this replica sees them (see the module docs).
pub(super) struct Releases {
    /// The releases committed, in log order.
    committed: Vec<ReleaseRecord>,
    /// Copies under way (`None`), or failed and to be tried again at a time (monotonic ms).
    copying: BTreeMap<String, Option<u64>>,
    /// Releases found here and proposed, with when (monotonic ms).
    proposed: BTreeMap<String, u64>,
    /// Releases found here under a committed name with other contents (warned once).
    conflicts: BTreeSet<String>,
    /// Release queries past their read index, waiting for their release to be copied here:
    /// (give up at, release, where the answer goes).
    waiting: Vec<(u64, ReleaseRecord, super::Answer)>,
    /// Copies report here.
    done: (
        mpsc::UnboundedSender<Copied>,
        mpsc::UnboundedReceiver<Copied>,
    ),
    /// The operator CA's certificate, which the replicas' certificates chain to.
    ca_cert: PathBuf,
}

impl Releases {
    /// No release known yet; copies check the replicas they copy from against `ca_cert`.
    pub(super) fn new(committed: Vec<ReleaseRecord>, ca_cert: PathBuf) -> Self {
        Releases {
            committed,
            copying: BTreeMap::new(),
            proposed: BTreeMap::new(),
            conflicts: BTreeSet::new(),
            waiting: Vec::new(),
            done: mpsc::unbounded_channel(),
            ca_cert,
        }
    }

    /// The committed releases changed.
    pub(super) fn committed(&mut self, releases: Vec<ReleaseRecord>) {
        self.committed = releases;
    }

    /// The next copy to finish.
    pub(super) async fn next_copied(&mut self) -> Option<Copied> {
        self.done.1.recv().await
    }

    /// A copy finished: logged; a failed one is tried again later.
    pub(super) fn copied(&mut self, (name, result): Copied, mono_ms: u64) {
        match result {
            Ok(()) => {
                tracing::info!(release = %name, "release copied here");
                // Not copied again while the index has yet to see it (it rescans each second).
                self.copying.insert(name, Some(mono_ms + COPY_AGAIN_MS));
            }
            Err(e) => {
                tracing::warn!(release = %name, "copying the release: {e}; trying again");
                self.copying.insert(name, Some(mono_ms + COPY_AGAIN_MS));
            }
        }
    }

    /// Proposes every release published here that the group has not committed.
    pub(super) fn offer(
        &mut self,
        shared: &Shared,
        rc: &mut ReplicatedCore,
        mono_ms: u64,
    ) -> Result<Vec<MachineAction>, ReplicaError> {
        let mut actions = Vec::new();
        for p in shared.releases.cached().iter() {
            let name = &p.signed.manifest.name;
            if let Some(c) = self.committed.iter().find(|c| &c.name == name) {
                if c.manifest != p.signed.manifest_id() && self.conflicts.insert(name.clone()) {
                    tracing::warn!(
                        release = %name,
                        "{} is not the release the group committed under this name; not \
                         served (publish it under another name)",
                        p.dir.display()
                    );
                }
                continue;
            }
            if self
                .proposed
                .get(name)
                .is_some_and(|&at| mono_ms < at + PROPOSE_AGAIN_MS)
            {
                continue;
            }
            self.proposed.insert(name.clone(), mono_ms);
            let record = ReleaseRecord {
                name: name.clone(),
                round: p.signed.manifest.round,
                manifest: p.signed.manifest_id(),
                signature: p.signed.signature.clone(),
                key: p.signed.manifest.key().to_hex(),
                from: rc.replica().id(),
            };
            tracing::info!(release = %name, "proposing the release to the group");
            match rc.propose_release(&record) {
                Ok(a) => actions.extend(a),
                // No leader to forward it to now: proposed again later.
                Err(ReplicaError::Raft(e)) => tracing::debug!("release {name}: {e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(actions)
    }

    /// Starts copying each committed release not here (and not being copied) from the replica
    /// that proposed it, else from the others.
    pub(super) fn copy_missing(
        &mut self,
        shared: &Arc<Shared>,
        members: &[ReplicaEntry],
        me: u64,
        mono_ms: u64,
    ) {
        let here = shared.releases.cached();
        for r in &self.committed {
            if held(&here, r) {
                self.copying.remove(&r.name);
                continue;
            }
            match self.copying.get(&r.name) {
                Some(None) => continue,
                Some(Some(at)) if mono_ms < *at => continue,
                _ => {}
            }
            let Some(key) = PublicKey::from_hex(&r.key) else {
                tracing::warn!(release = %r.name, "committed with a malformed key; not copied");
                self.copying.insert(r.name.clone(), Some(u64::MAX));
                continue;
            };
            let sources: Vec<ReplicaEntry> = members
                .iter()
                .filter(|m| m.id == r.from)
                .chain(members.iter().filter(|m| m.id != r.from && m.id != me))
                .cloned()
                .collect();
            self.copying.insert(r.name.clone(), None);
            let out = shared.layout.releases().join(&r.name);
            let (name, tx, ca) = (r.name.clone(), self.done.0.clone(), self.ca_cert.clone());
            tokio::spawn(async move {
                let trust = Trust::key(key);
                let mut last = String::from("no replica to copy it from");
                if let Some(dir) = out.parent()
                    && let Err(e) = std::fs::create_dir_all(dir)
                {
                    let _ = tx.send((name, Err(format!("{}: {e}", dir.display()))));
                    return;
                }
                for m in sources {
                    let src = QuicSource {
                        addr: m.workers,
                        server_name: m.name.clone(),
                        server_ca: Some(ca.clone()),
                        drop_after_bytes: None,
                    };
                    let progress = Arc::new(AtomicU64::new(0));
                    match fetch_quic(&src, &name, &out, &trust, progress).await {
                        Ok(_) => {
                            let _ = tx.send((name, Ok(())));
                            return;
                        }
                        Err(e) => last = format!("from replica {} ({}): {e}", m.id, m.name),
                    }
                }
                let _ = tx.send((name, Err(last)));
            });
        }
    }

    /// A release query whose read index this replica has applied: answered from the committed
    /// releases once the one it names is here.
    pub(super) fn ask(&mut self, shared: &Shared, name: &str, answer: super::Answer, mono_ms: u64) {
        match resolve(&self.committed, name) {
            None => {
                let names: Vec<&str> = self.committed.iter().map(|r| r.name.as_str()).collect();
                let _ = answer.send(not_found(name, &names));
            }
            Some(r) if held(&shared.releases.cached(), r) => {
                let _ = answer.send(info(r));
            }
            Some(r) => self
                .waiting
                .push((mono_ms + COPY_WAIT_MS, r.clone(), answer)),
        }
    }

    /// Answers the waiting queries whose release arrived, and gives up on those waiting too
    /// long.
    pub(super) fn answer_waiting(&mut self, shared: &Shared, mono_ms: u64) {
        if self.waiting.is_empty() {
            return;
        }
        let here = shared.releases.cached();
        for (until, r, answer) in std::mem::take(&mut self.waiting) {
            if held(&here, &r) {
                let _ = answer.send(info(&r));
            } else if mono_ms >= until || answer.is_closed() {
                let _ = answer.send(ServerMsg::Error {
                    code: ErrorCode::Internal,
                    message: format!(
                        "release `{}` is committed but still being copied to this replica; ask \
                         again, or ask another replica",
                        r.name
                    ),
                });
            } else {
                self.waiting.push((until, r, answer));
            }
        }
    }
}

/// Re-reads the releases folder every second (when it changed), so that a release published
/// here is proposed and a copied one served without waiting for a query.
pub(super) async fn rescan(shared: Arc<Shared>) {
    loop {
        shared.releases.current().await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Whether `r` is published here (the same manifest).
fn held(here: &[release::Published], r: &ReleaseRecord) -> bool {
    release::find(here, &r.name).is_some_and(|p| p.signed.manifest_id() == r.manifest)
}

/// The committed release `name` names (`latest`: the highest round, unless one is called so).
fn resolve<'a>(committed: &'a [ReleaseRecord], name: &str) -> Option<&'a ReleaseRecord> {
    if name == "latest" && !committed.iter().any(|r| r.name == "latest") {
        return committed.iter().max_by_key(|r| (r.round, r.name.clone()));
    }
    committed.iter().find(|r| r.name == name)
}

fn info(r: &ReleaseRecord) -> ServerMsg {
    ServerMsg::ReleaseInfo {
        name: r.name.clone(),
        manifest: r.manifest,
        signature: r.signature.clone(),
    }
}

/// The answer for a release that is not there, naming those that are (within a message's
/// text limit however many there are, and whatever name was asked for).
pub(super) fn not_found(name: &str, names: &[&str]) -> ServerMsg {
    let mut names = names.to_vec();
    names.sort_unstable();
    let text = format!(
        "no release `{}` here (published: {})",
        brief(name, 200),
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    );
    ServerMsg::Error {
        code: ErrorCode::NotFound,
        message: brief(&text, MAX_STRING - 64),
    }
}
