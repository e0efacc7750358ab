//! `worker.toml`: what `amity worker --config` reads, the same settings as its flags (a flag
//! given on the command line wins over the file).
//!
//! ```toml
//! coordinator = ["coord-a@a.example.org:7700", "coord-b@b.example.org:7700"]
//! cert = "certs/uni-paris.crt"      # relative paths are taken from this file's folder
//! ca = "certs/ca.crt"
//! backend = "cuda"
//! cache = "/var/cache/amity/worker"
//! metrics_listen = "127.0.0.1:9465"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use amity_shared::config::{ConfigError, read_toml, relative_to};
use serde::{Deserialize, Serialize};

/// The whole `worker.toml`; every key is optional (the flags or their defaults fill the rest).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The coordinator's address, or every replica's (`host:port` or `name@host:port`).
    #[serde(default)]
    pub coordinator: Vec<String>,
    /// The institution's certificate.
    pub cert: Option<PathBuf>,
    /// Its private key (default: the certificate's path with `.key`).
    pub key: Option<PathBuf>,
    /// The operator CA certificate.
    pub ca: Option<PathBuf>,
    /// The certificate name expected of coordinator addresses that name none.
    pub server_name: Option<String>,
    /// Compute backend (`flex`, `cuda`, `rocm`, `wgpu`, `vulkan`, `metal`).
    pub backend: Option<String>,
    /// Cache of fetched shards and outgoing updates.
    pub cache: Option<PathBuf>,
    /// The institution's own shard store, registered by id only.
    pub corpus: Option<PathBuf>,
    /// Serve Prometheus `/metrics` on this TCP address.
    pub metrics_listen: Option<SocketAddr>,
}

impl WorkerConfig {
    /// Reads a config file; relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: WorkerConfig = read_toml(path)?;
        relative_to(
            path,
            [
                &mut cfg.cert,
                &mut cfg.key,
                &mut cfg.ca,
                &mut cfg.cache,
                &mut cfg.corpus,
            ]
            .into_iter()
            .flatten(),
        );
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_follow_the_file_and_unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("amity-worker-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("worker.toml");
        std::fs::write(
            &file,
            "coordinator = [\"c@127.0.0.1:7700\"]\ncert = \"certs/a.crt\"\nca = \"/etc/ca.crt\"\n",
        )
        .unwrap();
        let cfg = WorkerConfig::load(&file).unwrap();
        assert_eq!(cfg.cert, Some(dir.join("certs/a.crt")));
        assert_eq!(cfg.ca, Some(PathBuf::from("/etc/ca.crt")));
        std::fs::write(&file, "bakend = \"cuda\"\n").unwrap();
        let e = WorkerConfig::load(&file).unwrap_err().to_string();
        assert!(e.contains("worker.toml") && e.contains("bakend"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
