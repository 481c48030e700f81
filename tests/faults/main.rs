//! The fault suite: replicas as separate processes of the real binary, each
//! in its own network namespace with its own address on a shared bridge,
//! finding each other through a real DNS server (dnsmasq), under continuous
//! ack=ALL Broadcasts while replicas are killed, frozen, cut off, rolled and
//! while DNS goes away. Every message is accounted for (see `ledger`), and
//! each scenario prints its table.
//!
//! It needs root, iproute2 and dnsmasq, so a plain `cargo test` skips it;
//! `.ci/run` runs it through `.ci/faults.sh`, which installs them. By hand:
//!
//! ```text
//! sudo -E cargo test --test faults -- --ignored --nocapture --test-threads 1
//! ```

mod lab;
mod ledger;
mod traffic;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use lab::Lab;
use ledger::{Fault, FaultKind};
use replicast::proto::v1::ListPeersRequest;
use traffic::{Endpoints, SlotOf, Traffic};

const REPLICAS: usize = 5;
/// The replica every single-replica fault hits.
const VICTIM: usize = 2;
/// Broadcasts per second: steady load that leaves the 2-core CI machine
/// room to schedule five replicas and the clients.
const PER_SECOND: u32 = 150;
/// Load before the fault.
const STEADY: Duration = Duration::from_secs(3);
/// Load after the fault is restored: long enough for peers that marked the
/// replica failing to take it back (their redelivery probes it every round;
/// the Broadcasts' own probe backoff doubles from 500 ms) and for the suite
/// to see every Broadcast acknowledged by it again.
const RECOVERY: Duration = Duration::from_secs(8);
/// How long a replica stays frozen or cut off: well past --peer-timeout
/// (1 s), so peers time out on it, skip it and queue its messages.
const FAULT: Duration = Duration::from_secs(4);
/// How long a terminating replica stays in DNS and the clients' endpoints
/// after its SIGTERM (less than the replicas' 3 s --drain-timeout).
const ENDPOINTS_LAG: Duration = Duration::from_secs(1);
/// Bound on healing after the load stops: the redelivery window (30 s) plus
/// a margin.
const SETTLE: Duration = Duration::from_secs(40);

/// Labs use the same port, bridge names and the machine's two cores: one at
/// a time, even when the harness runs tests in parallel.
static ONE_LAB_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A lab with every replica running, published in DNS, and seeing all the
/// others; clients and a subscriber per replica attached.
struct Run {
    lab: Lab,
    endpoints: Endpoints,
    traffic: Traffic,
    faults: Vec<Fault>,
    /// The scenario's trouble, when it is not only replica faults.
    window: Option<(Instant, Instant)>,
}

impl Run {
    async fn start(n: u8) -> Self {
        let mut lab = Lab::new(n, REPLICAS).await;
        lab.publish(0..REPLICAS);
        for slot in 0..REPLICAS {
            lab.start_replica(slot);
        }
        let endpoints = Endpoints::default();
        for slot in 0..REPLICAS {
            assert_eq!(endpoints.add(lab.addr(slot)), slot);
        }
        endpoints.set_routable(0..REPLICAS);
        let mut run = Self {
            lab,
            endpoints,
            traffic: Traffic::new(),
            faults: Vec::new(),
            window: None,
        };
        run.wait_converged(REPLICAS).await;
        for slot in 0..REPLICAS {
            run.traffic.subscribe(&run.endpoints, slot);
        }
        run
    }

    /// Freezes (SIGSTOP) or cuts off (link down) `slot`, or undoes it.
    async fn set_reachable(&self, slot: usize, kind: FaultKind, reachable: bool) {
        match (kind, reachable) {
            (FaultKind::Frozen, false) => self.lab.signal(slot, libc::SIGSTOP),
            (FaultKind::Frozen, true) => self.lab.signal(slot, libc::SIGCONT),
            (FaultKind::CutOff, up) => self.lab.set_link(slot, up).await,
            (other, _) => panic!("{other:?} is not a reachability fault"),
        }
    }

    /// Records that `slot` was under `kind` since `began`, restored now.
    fn record_fault(&mut self, slot: usize, kind: FaultKind, began: Instant) {
        self.faults.push(Fault {
            slot,
            kind,
            began,
            restored: Instant::now(),
        });
    }

    fn start_load(&mut self) {
        let slot_of: SlotOf = Arc::new(self.lab.slot_of());
        self.traffic.send(&self.endpoints, slot_of, PER_SECOND);
    }

    /// Waits until every running replica lists exactly the `count` published
    /// peers, from a fresh (not stale) lookup.
    async fn wait_converged(&self, count: usize) {
        let published: Vec<String> = self
            .lab
            .published()
            .iter()
            .map(|s| self.lab.addr(*s).to_string())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        'poll: loop {
            assert!(
                Instant::now() < deadline,
                "replicas did not converge on {count} peers within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            for slot in self.lab.published().iter().copied() {
                let mut client = self.endpoints.client(slot);
                let Ok(Ok(peers)) =
                    tokio::time::timeout(Duration::from_secs(1), client.list_peers(ListPeersRequest {}))
                        .await
                else {
                    continue 'poll;
                };
                let peers = peers.into_inner();
                let listed: Vec<&str> = peers.peers.iter().map(|p| p.address.as_str()).collect();
                if peers.stale
                    || listed.len() != count
                    || !published.iter().all(|p| listed.contains(&p.as_str()))
                {
                    continue 'poll;
                }
            }
            return;
        }
    }

    /// Stops the load, waits until every replica has what it should have
    /// (redeliveries included, bounded by [`SETTLE`]), stops the subscribers
    /// and returns the accounting, printed.
    async fn finish(mut self, title: &str) -> ledger::Report {
        self.traffic.stop_sending().await;
        let deadline = Instant::now() + SETTLE;
        let healed_after = Instant::now();
        while Instant::now() < deadline && self.traffic.ledger().missing(&self.faults) > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let settle = healed_after.elapsed();
        // Late duplicates would show up now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.traffic.stop_reading().await;
        let report = self.traffic.ledger().report(title, &self.faults, self.window);
        println!("{report}");
        println!(
            "(everything missing at the end of the load arrived within {} ms)",
            settle.as_millis()
        );
        report
    }
}

fn assert_clean(report: &ledger::Report) {
    assert!(
        report.violations.is_empty(),
        "{}: {} violations (see the table above)",
        report.title,
        report.violations.len()
    );
    assert!(
        report.delivered > 0 && report.acks > 0,
        "the scenario carried no traffic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2 and dnsmasq: bash .ci/faults.sh"]
async fn kill_9_one_of_five_mid_load_then_restart_it() {
    let _one = ONE_LAB_AT_A_TIME.lock().await;
    let mut run = Run::start(1).await;
    run.start_load();
    tokio::time::sleep(STEADY).await;

    let began = Instant::now();
    run.lab.kill(VICTIM).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = Instant::now();
    run.lab.start_replica(VICTIM);
    run.wait_converged(REPLICAS).await;
    run.record_fault(VICTIM, FaultKind::Killed { restarted }, began);

    tokio::time::sleep(RECOVERY).await;
    let report = run
        .finish("1. kill -9 one of five replicas mid-load, then start it again")
        .await;
    assert_clean(&report);
    assert!(
        report.incarnations > REPLICAS,
        "the restarted replica's new incarnation was read"
    );
}

/// Scenarios 2 and 3: one replica out of reach for [`FAULT`] under load
/// (`kind`: frozen or cut off), then back. Peers time out on it, skip it and
/// queue what it missed; it must get all of it once it is back.
async fn one_replica_out_of_reach(n: u8, kind: FaultKind, title: &str) {
    let _one = ONE_LAB_AT_A_TIME.lock().await;
    let mut run = Run::start(n).await;
    run.start_load();
    tokio::time::sleep(STEADY).await;

    let began = Instant::now();
    run.set_reachable(VICTIM, kind, false).await;
    tokio::time::sleep(FAULT).await;
    run.set_reachable(VICTIM, kind, true).await;
    run.record_fault(VICTIM, kind, began);

    tokio::time::sleep(RECOVERY).await;
    let report = run.finish(title).await;
    assert_clean(&report);
    assert!(
        report.redelivered > 0,
        "the replica missed messages while out of reach and got them redelivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2 and dnsmasq: bash .ci/faults.sh"]
async fn freeze_one_replica_past_the_peer_deadline_then_thaw_it() {
    one_replica_out_of_reach(
        2,
        FaultKind::Frozen,
        "2. SIGSTOP one replica for 4 s (peer deadline 1 s), then SIGCONT",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2 and dnsmasq: bash .ci/faults.sh"]
async fn cut_one_replica_off_the_network_then_restore_it() {
    one_replica_out_of_reach(
        3,
        FaultKind::CutOff,
        "3. cut one replica off the network (link down) for 4 s, then restore it",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2 and dnsmasq: bash .ci/faults.sh"]
async fn rolling_restart_of_every_replica_under_ack_all() {
    let _one = ONE_LAB_AT_A_TIME.lock().await;
    let mut run = Run::start(4).await;
    run.start_load();
    tokio::time::sleep(STEADY).await;

    for slot in 0..REPLICAS {
        let began = Instant::now();
        run.lab.signal(slot, libc::SIGTERM);
        // As in Kubernetes, the terminating pod leaves the endpoints (DNS and
        // the Service the clients use) only a while after its SIGTERM: peers
        // keep delivering to it, clients keep calling it (and are refused).
        tokio::time::sleep(ENDPOINTS_LAG).await;
        let others: Vec<usize> = (0..REPLICAS).filter(|s| *s != slot).collect();
        run.lab.publish(others.iter().copied());
        run.endpoints.set_routable(others);
        let status = run.lab.wait_exit(slot).await;
        let exited = Instant::now();
        assert!(
            status.success(),
            "replica {slot} exited with {status} after SIGTERM"
        );
        run.lab.start_replica(slot);
        run.lab.publish(0..REPLICAS);
        run.wait_converged(REPLICAS).await;
        run.endpoints.set_routable(0..REPLICAS);
        run.record_fault(slot, FaultKind::Terminated { exited }, began);
    }

    tokio::time::sleep(RECOVERY).await;
    let report = run
        .finish("4. rolling restart of all five (SIGTERM, DNS record removed and re-added), ack=ALL")
        .await;
    // Peers stop targeting a draining replica once they heard its leave;
    // what they sent it before that (`acked_while_draining`, often none) is
    // read from it like everything else (assert_clean).
    assert_clean(&report);
    assert!(
        report.incarnations >= 2 * REPLICAS,
        "every replica was read in two incarnations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2 and dnsmasq: bash .ci/faults.sh"]
async fn dns_down_then_back_and_a_replica_added_meanwhile_joins() {
    let _one = ONE_LAB_AT_A_TIME.lock().await;
    let mut run = Run::start(5).await;
    run.start_load();
    tokio::time::sleep(STEADY).await;

    let outage = Instant::now();
    run.lab.stop_dns().await;
    // Every replica keeps its last good set, marked stale.
    let deadline = Instant::now() + Duration::from_secs(10);
    for slot in 0..REPLICAS {
        loop {
            let peers = run.endpoints.client(slot).list_peers(ListPeersRequest {}).await;
            let peers = peers.expect("ListPeers while DNS is down").into_inner();
            if peers.stale {
                assert_eq!(peers.peers.len(), REPLICAS, "the last good set is kept");
                assert!(!peers.last_error.is_empty(), "the lookup error is reported");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {slot} never reported its peer set stale"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A sixth replica is scheduled while DNS is down: its record is written,
    // and it starts, but nobody (itself included) can resolve it yet.
    let added = run.lab.add_host().await;
    assert_eq!(run.endpoints.add(run.lab.addr(added)), added);
    run.lab.publish(0..=added);
    run.lab.start_replica(added);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let began = Instant::now();
    run.lab.start_dns().await;
    run.wait_converged(REPLICAS + 1).await;
    // Ready: its app subscribes, and clients may call it.
    run.traffic.subscribe(&run.endpoints, added);
    run.endpoints.set_routable(0..=added);
    run.record_fault(added, FaultKind::Joined, began);
    run.window = Some((outage, Instant::now()));

    tokio::time::sleep(RECOVERY).await;
    let report = run
        .finish(
            "5. DNS server stopped until every replica reports its peers stale, then restarted; a sixth replica added to DNS meanwhile joins",
        )
        .await;
    assert_clean(&report);
    assert!(
        report.rejoin.iter().any(|(slot, _)| *slot == added),
        "the added replica acknowledged Broadcasts"
    );
}

/// How late the DNS of the stale-DNS scenario follows the pods, both ways
/// (CoreDNS's usual `ttl 30` plus `cache 30`).
const DNS_LAG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2 and dnsmasq: bash .ci/faults.sh"]
async fn rolling_restart_onto_new_pods_behind_dns_that_lags_30s() {
    let _one = ONE_LAB_AT_A_TIME.lock().await;
    let mut run = Run::start(6).await;
    run.start_load();
    tokio::time::sleep(STEADY).await;

    // As a Deployment rolls (maxSurge 1, maxUnavailable 0): a new pod on a
    // new address starts and becomes ready, then an old one is terminated.
    // DNS shows each change only DNS_LAG later; the replicas' announcements
    // must carry them meanwhile.
    let mut listed: std::collections::BTreeSet<usize> = (0..REPLICAS).collect();
    let mut dns_changes: Vec<(Instant, usize, bool)> = Vec::new();
    let mut routable: Vec<usize> = (0..REPLICAS).collect();
    let outage = Instant::now();
    for old in 0..REPLICAS {
        let began = Instant::now();
        let new = run.lab.add_host().await;
        assert_eq!(run.endpoints.add(run.lab.addr(new)), new);
        run.lab.start_replica(new);
        wait_serving(run.lab.addr(new)).await;
        dns_changes.push((Instant::now() + DNS_LAG, new, true));
        run.traffic.subscribe(&run.endpoints, new);
        routable.push(new);
        run.endpoints.set_routable(routable.clone());
        run.record_fault(new, FaultKind::Joined, began);

        let began = Instant::now();
        run.lab.signal(old, libc::SIGTERM);
        dns_changes.push((Instant::now() + DNS_LAG, old, false));
        // The clients' endpoints follow faster than DNS (as kube-proxy's do).
        tokio::time::sleep(ENDPOINTS_LAG).await;
        routable.retain(|s| *s != old);
        run.endpoints.set_routable(routable.clone());
        let status = run.lab.wait_exit(old).await;
        let exited = Instant::now();
        assert!(
            status.success(),
            "replica {old} exited with {status} after SIGTERM"
        );
        run.record_fault(old, FaultKind::Retired { exited }, began);
    }
    // DNS catches up, one change at a time, under the same load.
    for (due, slot, add) in dns_changes {
        tokio::time::sleep_until(due.into()).await;
        if add {
            listed.insert(slot);
        } else {
            listed.remove(&slot);
        }
        run.lab.publish(listed.iter().copied());
    }
    run.window = Some((outage, Instant::now()));

    tokio::time::sleep(RECOVERY).await;
    let report = run
        .finish("6. rolling restart onto five new pods behind DNS that lags 30 s both ways, ack=ALL")
        .await;
    assert_clean(&report);
    assert_eq!(
        report.fully_acked, report.sent,
        "every Broadcast was acknowledged by every replica it targeted"
    );
    assert_eq!(
        report.healthy_failures, 0,
        "no receipt of a serving replica failed"
    );
}

/// Waits until the replica at `addr` says SERVING (its join is announced).
async fn wait_serving(addr: std::net::SocketAddr) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "{addr} not SERVING within 20 s");
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("valid uri")
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await;
        if let Ok(channel) = channel
            && let Ok(answer) = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            && answer.get_ref().status == ServingStatus::Serving as i32
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
