//! Each replica's web surface (`[http]` on its own host's loopback, reached with curl inside its
//! network namespace): its metrics know its place in the group, and admin actions go through
//! the leader and reach every replica.

use std::time::Duration;

use serde_json::Value;

use super::{ADMIN_TOKEN, Group, REPLICAS};

impl Group {
    /// An HTTP request to replica `id`'s web surface, made on its host with curl: the status
    /// code and the body.
    fn http(&self, id: u64, method: &str, path: &str) -> (u16, String) {
        let out = self
            .net
            .command(id as usize - 1, "curl")
            .args(["-s", "-X", method, "-w", "\n%{http_code}"])
            .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .arg(format!("http://127.0.0.1:9464{path}"))
            .output()
            .expect("curl (scripts/install-deps installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Sample `name` (no labels) of replica `id`'s `/metrics`.
    fn metric(&self, id: u64, name: &str) -> f64 {
        let (code, text) = self.http(id, "GET", "/metrics");
        assert_eq!(code, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

/// Each replica's `/metrics` shows its Raft place as its `status.json` does; an admin action on
/// a follower is refused naming the leader, and one on the leader is replicated to every
/// replica.
pub(super) fn the_web_surface_knows_its_replica(g: &Group, leader: u64) {
    for id in 1..=REPLICAS {
        let st = g.status(id).unwrap();
        assert_eq!(
            g.metric(id, "amity_raft_term"),
            st["replica"]["term"].as_f64().unwrap()
        );
        let leads = if id == leader { 1.0 } else { 0.0 };
        assert_eq!(g.metric(id, "amity_raft_is_leader"), leads, "replica {id}");
        assert_eq!(
            g.metric(id, "amity_raft_leader"),
            leader as f64,
            "replica {id}"
        );
    }
    let follower = (1..=REPLICAS).find(|&i| i != leader).unwrap();
    let (code, said) = g.http(follower, "POST", "/admin/pause");
    assert_eq!(code, 409, "{said}");
    assert!(said.contains(&format!("coord-{leader}@")), "{said}");
    let (code, said) = g.http(leader, "POST", &format!("/admin/revoke/coord-{follower}"));
    assert_eq!(code, 400, "a replica is removed, not revoked: {said}");
    let (code, said) = g.http(leader, "POST", "/admin/revoke/uni-z");
    assert_eq!(code, 200, "{said}");
    g.wait_for(
        "the revocation on every replica",
        Duration::from_secs(30),
        |g| {
            (1..=REPLICAS).all(|id| {
                let (_, body) = g.http(id, "GET", "/status.json");
                serde_json::from_str::<Value>(&body)
                    .is_ok_and(|s| s["operator"]["revoked"] == serde_json::json!(["uni-z"]))
            })
        },
    );
}
