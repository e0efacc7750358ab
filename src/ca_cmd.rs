//! `amity ca`: the operator's certificate authority and institution certificates.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, Subcommand};

use amity_protocol::tls::{CertRole, Identity, init_ca, issue, issue_as};

/// `amity ca`.
#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

/// The CA tasks.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the operator CA (`ca.crt`, `ca.key`) in a folder; never overwrites one.
    Init {
        /// The CA folder (keep `ca.key` secret).
        #[arg(long, default_value = "amity-ca")]
        dir: PathBuf,
        /// The operator's name, written into the CA certificate.
        #[arg(long, default_value = "Amity operator")]
        operator: String,
    },
    /// Issue a certificate for an institution (a worker), a coordinator, or a coordinator replica.
    Issue {
        /// The CA folder.
        #[arg(long, default_value = "amity-ca")]
        dir: PathBuf,
        /// The name: the peer's identity as the coordinator sees it (e.g. `uni-paris`).
        #[arg(long)]
        name: String,
        /// DNS names or IP addresses the holder serves under (coordinators only).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// `member` (an institution or a single coordinator), `replica` (a coordinator
        /// replica: only such certificates may speak Raft to the other replicas) or `operator`
        /// (whoever runs the coordinator: only such may change its membership).
        #[arg(long, default_value = "member", value_parser = ["member", "replica", "operator"])]
        role: String,
    },
    /// Create the coordinator's release signing key (`release.key`, `release.pub`, Ed25519);
    /// never overwrites one. Publish `release.pub` (or its hex) for downstream users.
    ReleaseKey {
        /// The folder (by default the CA folder, where `amity release` looks for it).
        #[arg(long, default_value = "amity-ca")]
        dir: PathBuf,
    },
}

/// Runs `amity ca`.
pub fn run(args: CaArgs) -> Result<()> {
    match args.command {
        CaCommand::Init { dir, operator } => {
            let files = init_ca(&dir, &operator)?;
            println!(
                "created CA {} (certificate {}, private key {}: keep it offline)",
                operator,
                files.cert().display(),
                files.key().display()
            );
        }
        CaCommand::Issue {
            dir,
            name,
            hosts,
            role,
        } => {
            let role = match role.as_str() {
                "replica" => CertRole::Replica,
                "operator" => CertRole::Operator,
                _ => CertRole::Member,
            };
            let (cert, key) = issue_as(&dir, &name, &hosts, role)?;
            println!(
                "issued {name}: {} and {} (give both, with ca.crt, to {name})",
                cert.display(),
                key.display()
            );
        }
        CaCommand::ReleaseKey { dir } => crate::release_cmd::release_key(&dir)?,
    }
    Ok(())
}

/// Creates a CA with a coordinator and the named workers (for the demo and tests).
pub fn make_pki(dir: &Path, workers: &[&str]) -> Result<()> {
    init_ca(dir, "amity demo operator")?;
    issue(
        dir,
        "coordinator",
        &["localhost".into(), "127.0.0.1".into()],
    )?;
    for w in workers {
        issue(dir, w, &[])?;
    }
    Ok(())
}

/// The identity in certificate `cert`, its key (`key`, else beside the certificate with `.key`:
/// the layout `amity ca issue` writes) and the CA certificate `ca`: how every command that
/// takes `--cert`, `--key` and `--ca` loads them.
pub(crate) fn load_identity(
    cert: &Path,
    key: Option<&Path>,
    ca: &Path,
) -> Result<Identity, amity_protocol::tls::TlsError> {
    let key = key.map_or_else(|| cert.with_extension("key"), Path::to_path_buf);
    Identity::load(cert, &key, ca)
}
