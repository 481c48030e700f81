//! The lab: a Linux bridge, one network namespace per replica with its own
//! address on that bridge, dnsmasq serving the headless name with one A
//! record per replica, and the replica processes (the real binary).
//!
//! Everything it creates is removed when it is dropped, a panicking test
//! included; what a run killed outright left behind (its processes die with
//! it through PDEATHSIG) is removed by the next run.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

/// The port every replica listens on, as in a pod spec.
pub const PORT: u16 = 7420;
/// The headless Service's name, served by dnsmasq.
pub const HEADLESS: &str = "replicast-headless.faults.test";
/// Every name this suite creates (namespaces, links) starts with this and
/// the pid of the run that created it.
const PREFIX: &str = "rcf";

/// The replicas' --broadcast-timeout: the deadline of a Broadcast whose
/// caller sets none (the suite's clients do not).
pub const BROADCAST_TIMEOUT: Duration = Duration::from_secs(2);

/// What every replica is started with: timings short enough for a suite
/// that runs in minutes, shaped like a production configuration.
pub const REPLICA_FLAGS: &[&str] = &[
    "--peer-timeout",
    "1s",
    "--broadcast-timeout",
    "2s", // BROADCAST_TIMEOUT
    "--refresh-interval",
    "500ms",
    "--drain-timeout",
    "3s",
    "--redelivery-window",
    "30s",
    "--replay-capacity",
    "200000",
];

pub struct Lab {
    /// `rcf<pid>-<n>`: the bridge's name and the prefix of every other name.
    id: String,
    /// The first three octets of the lab's 10.x.y.0/24.
    net: [u8; 3],
    dir: PathBuf,
    hosts: Vec<Host>,
    dns: Option<Child>,
    /// Slots with an A record.
    published: BTreeSet<usize>,
}

struct Host {
    netns: String,
    veth: String,
    replica: Option<Child>,
    starts: usize,
}

impl Lab {
    /// A bridge, `hosts` namespaces and dnsmasq (with no records yet).
    /// `n` tells this run's labs apart (0-9).
    pub async fn new(n: u8, hosts: usize) -> Self {
        preflight();
        remove_leftovers().await;
        let id = format!("{PREFIX}{}-{n}", std::process::id());
        let net = free_subnet().await;
        let dir = std::env::temp_dir().join(format!("replicast-faults-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the lab directory");
        let mut lab = Self {
            id,
            net,
            dir,
            hosts: Vec::new(),
            dns: None,
            published: BTreeSet::new(),
        };
        let gateway = format!("{}/24", lab.gateway());
        ip(&["link", "add", &lab.id, "type", "bridge"]).await;
        ip(&["addr", "add", &gateway, "dev", &lab.id]).await;
        ip(&["link", "set", &lab.id, "up"]).await;
        for _ in 0..hosts {
            lab.add_host().await;
        }
        lab.write_hosts_file();
        lab.start_dns().await;
        lab
    }

    /// Another namespace on the bridge; returns its slot.
    pub async fn add_host(&mut self) -> usize {
        let slot = self.hosts.len();
        assert!(
            slot < 10,
            "a lab has at most 10 hosts (interface names are short)"
        );
        let netns = format!("{}-{slot}", self.id);
        let veth = format!("{}h{slot}", self.id);
        let address = format!("{}/24", self.ip(slot));
        // Known to Drop before anything exists, so a failure below leaves
        // nothing behind.
        self.hosts.push(Host {
            netns: netns.clone(),
            veth: veth.clone(),
            replica: None,
            starts: 0,
        });
        ip(&["netns", "add", &netns]).await;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])
        .await;
        ip(&["link", "set", &veth, "master", &self.id]).await;
        ip(&["link", "set", &veth, "up"]).await;
        ip(&["-n", &netns, "addr", "add", &address, "dev", "eth0"]).await;
        ip(&["-n", &netns, "link", "set", "eth0", "up"]).await;
        ip(&["-n", &netns, "link", "set", "lo", "up"]).await;
        slot
    }

    fn gateway(&self) -> Ipv4Addr {
        let [a, b, c] = self.net;
        Ipv4Addr::new(a, b, c, 1)
    }

    pub fn ip(&self, slot: usize) -> Ipv4Addr {
        let [a, b, c] = self.net;
        Ipv4Addr::new(a, b, c, 10 + slot as u8)
    }

    pub fn addr(&self, slot: usize) -> SocketAddr {
        SocketAddr::from((self.ip(slot), PORT))
    }

    /// Maps a replica's `host:port` (as receipts name it) to its slot,
    /// including hosts added later.
    pub fn slot_of(&self) -> impl Fn(&str) -> Option<usize> + Send + Sync + 'static {
        let net = self.net;
        move |peer: &str| match peer.parse::<SocketAddr>().ok()? {
            SocketAddr::V4(addr) if addr.port() == PORT && addr.ip().octets()[..3] == net => {
                usize::from(addr.ip().octets()[3]).checked_sub(10)
            }
            _ => None,
        }
    }

    /// Starts a replica process in `slot`'s namespace.
    pub fn start_replica(&mut self, slot: usize) {
        let listen = self.addr(slot).to_string();
        let dns = SocketAddr::from((self.gateway(), 53)).to_string();
        let host = &mut self.hosts[slot];
        assert!(host.replica.is_none(), "replica {slot} is already running");
        host.starts += 1;
        let log = self.dir.join(format!("replica-{slot}-{}.log", host.starts));
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &host.netns,
                env!("CARGO_BIN_EXE_replicast"),
                "serve",
            ])
            .args(["--listen", &listen, "--peers-dns", HEADLESS, "--dns-server", &dns])
            .args(["--log-format", "json"])
            .args(REPLICA_FLAGS)
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create a replica log"));
        host.replica = Some(spawn_tied_to_us(command));
    }

    pub fn pid(&self, slot: usize) -> i32 {
        let child = self.hosts[slot].replica.as_ref().expect("replica running");
        child.id().expect("replica not reaped") as i32
    }

    /// Sends `signal` to the replica in `slot`.
    pub fn signal(&self, slot: usize, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        let result = unsafe { libc::kill(self.pid(slot), signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", self.pid(slot));
    }

    /// `kill -9`, and reaps it.
    pub async fn kill(&mut self, slot: usize) {
        let mut child = self.hosts[slot].replica.take().expect("replica running");
        child.kill().await.expect("SIGKILL the replica");
    }

    /// Waits (bounded) for the replica, told to stop, to exit.
    pub async fn wait_exit(&mut self, slot: usize) -> ExitStatus {
        let mut child = self.hosts[slot].replica.take().expect("replica running");
        tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("replica {slot} still running after 20 s"))
            .expect("wait for the replica")
    }

    /// Takes the replica's link down (a partition: packets vanish, nothing
    /// is refused) or back up.
    pub async fn set_link(&self, slot: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.hosts[slot].veth, state]).await;
    }

    /// Makes the headless name resolve to exactly `slots`, and tells dnsmasq
    /// (if running) to reload, as the endpoints controller would.
    pub fn publish(&mut self, slots: impl IntoIterator<Item = usize>) {
        self.published = slots.into_iter().collect();
        self.write_hosts_file();
        if let Some(pid) = self.dns.as_ref().and_then(Child::id) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped.
            let result = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
            assert_eq!(result, 0, "SIGHUP dnsmasq: {}", std::io::Error::last_os_error());
        }
    }

    pub fn published(&self) -> &BTreeSet<usize> {
        &self.published
    }

    fn write_hosts_file(&self) {
        let records: String = self
            .published
            .iter()
            .map(|slot| format!("{} {HEADLESS}\n", self.ip(*slot)))
            .collect();
        let path = self.dir.join("hosts");
        let staged = self.dir.join("hosts.new");
        std::fs::write(&staged, records).expect("write the hosts file");
        std::fs::rename(&staged, &path).expect("replace the hosts file");
    }

    /// Starts dnsmasq on the bridge address, serving only the hosts file.
    pub async fn start_dns(&mut self) {
        assert!(self.dns.is_none(), "dnsmasq is already running");
        let mut command = Command::new(find_program("dnsmasq"));
        command
            .arg("--keep-in-foreground")
            .arg("--conf-file=/dev/null")
            .args(["--no-resolv", "--no-hosts", "--bind-interfaces", "--user=root"])
            .arg(format!("--listen-address={}", self.gateway()))
            .arg(format!("--addn-hosts={}", self.dir.join("hosts").display()))
            .arg(format!("--pid-file={}", self.dir.join("dnsmasq.pid").display()))
            .arg(format!(
                "--log-facility={}",
                self.dir.join("dnsmasq.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied_to_us(command);
        // Ready once it answers a query; it fails fast (port taken) or not at all.
        let socket = tokio::net::UdpSocket::bind((self.gateway(), 0))
            .await
            .expect("bind a DNS client socket");
        let query = a_query(HEADLESS);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("poll dnsmasq") {
                let output = child.wait_with_output().await.expect("dnsmasq output");
                panic!(
                    "dnsmasq exited at start ({status}): {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            assert!(Instant::now() < deadline, "dnsmasq did not answer within 10 s");
            socket
                .send_to(&query, (self.gateway(), 53))
                .await
                .expect("send a DNS query");
            let mut answer = [0u8; 512];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(100), socket.recv(&mut answer)).await
            {
                break;
            }
        }
        self.dns = Some(child);
    }

    pub async fn stop_dns(&mut self) {
        let mut dns = self.dns.take().expect("dnsmasq running");
        dns.kill().await.expect("stop dnsmasq");
    }

    /// The last lines of every replica log, for a failure report.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs.iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} (last 15 lines)\n", log.display()));
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in self.hosts.iter_mut().filter_map(|h| h.replica.as_mut()) {
            let _ = child.start_kill();
        }
        if let Some(dns) = self.dns.as_mut() {
            let _ = dns.start_kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "fault suite failed; replica and dnsmasq logs:\n{}",
                self.log_tails()
            );
        }
        // Synchronous on purpose: this runs in Drop, possibly while unwinding.
        for host in &self.hosts {
            ip_blocking(&["netns", "del", &host.netns]);
        }
        ip_blocking(&["link", "del", &self.id]);
        if std::thread::panicking() {
            eprintln!("full logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A DNS query (RFC 1035) for the A records of `name`.
fn a_query(name: &str) -> Vec<u8> {
    // id 0x7263, recursion desired, one question.
    let mut query = vec![0x72, 0x63, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    query
}

/// Fails with what to do when the suite cannot run here.
fn preflight() {
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the fault suite creates network namespaces and needs root: \
         sudo -E cargo test --test faults -- --ignored (or bash .ci/faults.sh)"
    );
    for program in ["ip", "dnsmasq"] {
        assert!(
            find_program(program).exists(),
            "`{program}` not found: apt-get install iproute2 dnsmasq-base (bash .ci/faults.sh does)"
        );
    }
}

/// `name` on PATH, or in /usr/sbin and /sbin (often not on a user's PATH).
fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A 10.x.y.0/24 no interface or route of this machine uses.
async fn free_subnet() -> [u8; 3] {
    let addresses = ip_output(&["-4", "-o", "addr", "show"]).await;
    let routes = ip_output(&["-4", "route", "show", "table", "all"]).await;
    let seed = std::process::id();
    (0..250u32)
        .map(|i| {
            [
                10,
                200 + ((seed + i) % 50) as u8,
                ((seed / 50 + i * 7) % 250) as u8,
            ]
        })
        .find(|[a, b, c]| {
            let prefix = format!("{a}.{b}.{c}.");
            !addresses.contains(&prefix) && !routes.contains(&prefix)
        })
        .expect("a free 10.x.y.0/24")
}

/// Removes namespaces and bridges of earlier runs whose process is gone.
async fn remove_leftovers() {
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for line in ip_output(&["netns", "list"]).await.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if stale(name) {
            ip_blocking(&["netns", "del", name]);
        }
    }
    for line in ip_output(&["-o", "link", "show", "type", "bridge"]).await.lines() {
        // "12: rcf123-1: <BROADCAST,...>"
        let name = line.split(':').nth(1).unwrap_or_default().trim();
        if stale(name) {
            ip_blocking(&["link", "del", name]);
        }
    }
}

/// Spawns `command` so it dies with this process even when the test
/// process is killed outright (no Drop runs then).
fn spawn_tied_to_us(mut command: Command) -> Child {
    command.kill_on_drop(true);
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().expect("spawn a lab process")
}

async fn ip(args: &[&str]) {
    let output = Command::new(find_program("ip"))
        .args(args)
        .output()
        .await
        .expect("run ip");
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn ip_output(args: &[&str]) -> String {
    let output = Command::new(find_program("ip"))
        .args(args)
        .output()
        .await
        .expect("run ip");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// For cleanup: best effort, never panics.
fn ip_blocking(args: &[&str]) {
    let _ = std::process::Command::new(find_program("ip"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
