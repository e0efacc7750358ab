//! Separate hosts on one machine: a network namespace per host, each joined by a veth pair to a
//! bridge in a hub namespace, all made by the test and removed when it ends. A host is cut off
//! (a partition: its packets go nowhere) by taking its link down, and healed by bringing it up.
//! Needs root (CAP_NET_ADMIN) and iproute2 (`scripts/install-deps` installs it).

use std::net::Ipv4Addr;
use std::process::Command;

/// A private network of `hosts` hosts at 10.77.0.1, 10.77.0.2, ...
pub struct Net {
    tag: String,
    hosts: usize,
}

/// Runs `ip` with `args`, panicking with what it printed on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {}: {e} (is iproute2 installed?)", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Net {
    /// Makes the hub, its bridge and `hosts` namespaces linked to it.
    pub fn new(hosts: usize) -> Net {
        // Unique per process and per network (tests run in parallel), and short: interface
        // names have at most 15 characters.
        static NETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("a{}n{n}", std::process::id() % 100_000);
        let net = Net { tag, hosts: 0 };
        let hub = net.hub();
        ip(&["netns", "add", &hub]);
        let mut net = net;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for h in 0..hosts {
            let (ns, inner, outer) = (net.ns(h), net.inner(h), net.outer(h));
            ip(&["netns", "add", &ns]);
            net.hosts = h + 1;
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "netns", &hub]);
            let addr = format!("{}/24", net.addr(h));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &outer, "up"]);
        }
        net
    }

    fn hub(&self) -> String {
        format!("{}hub", self.tag)
    }

    fn ns(&self, host: usize) -> String {
        format!("{}h{host}", self.tag)
    }

    fn inner(&self, host: usize) -> String {
        format!("{}v{host}", self.tag)
    }

    fn outer(&self, host: usize) -> String {
        format!("{}b{host}", self.tag)
    }

    /// Host `host`'s address.
    pub fn addr(&self, host: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, host as u8 + 1)
    }

    /// `program` to be run on host `host` (`ip netns exec` replaces itself with the program, so
    /// the child's pid is the program's).
    pub fn command(&self, host: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host), program]);
        c
    }

    /// Cuts host `host` off the network.
    pub fn cut(&self, host: usize) {
        ip(&["-n", &self.hub(), "link", "set", &self.outer(host), "down"]);
    }

    /// Joins host `host` to the network again.
    pub fn heal(&self, host: usize) {
        ip(&["-n", &self.hub(), "link", "set", &self.outer(host), "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it.
        for h in 0..self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub()])
            .status();
    }
}
