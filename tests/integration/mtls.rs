//! mTLS between replicas, with certificates made by the test: the happy
//! path, peers that must be refused (another CA, expired, without the
//! workload identity, plaintext) named in receipts, peer RPCs refused to
//! callers without the identity, rotation of certificates and CA under
//! load, and the reload triggers (directory watch, poll, SIGHUP).

use crate::common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{
    Cluster, Hosts, ZONE,
    certs::{Ca, IDENTITY, Leaf, SecretDir},
    eventually, free_port_on, samples, scrape,
};
use replicast::{
    devdns::DevDns,
    error::broadcast_response_from_status,
    lifecycle::{Phase, lifecycle},
    proto::v1::{
        AckPolicy, AnnounceRequest, BroadcastRequest, DeliverFrame, DeliverRequest, Message,
        SubscribeRequest, announce_request::Kind, replicast_client::ReplicastClient,
    },
    server::ServerHandle,
    tls::{ClientCerts, Dialer, TlsMetrics, TlsSource, cli_client_config, spawn_tls_reload},
};
use tonic::{Code, Request};

/// A client that trusts `ca` and presents `cert` if given.
fn dialer(ca: &str, cert: Option<&Leaf>) -> Dialer {
    let config = cli_client_config(
        ca.as_bytes(),
        &IDENTITY.parse().unwrap(),
        cert.map(|leaf| (leaf.cert.as_bytes(), leaf.key.as_bytes())),
    )
    .expect("client TLS config");
    Dialer::fixed(config)
}

async fn connect(
    dialer: &Dialer,
    addr: SocketAddr,
) -> Result<ReplicastClient<tonic::transport::Channel>, String> {
    let endpoint = Dialer::endpoint(addr)
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let channel = dialer
        .connect(endpoint)
        .await
        .map_err(|e| replicast::error::error_chain(&e))?;
    Ok(ReplicastClient::new(channel))
}

/// Whether a health check over `dialer` gets an answer.
async fn health_answers(dialer: &Dialer, addr: SocketAddr) -> bool {
    let endpoint = Dialer::endpoint(addr)
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let Ok(channel) = dialer.connect(endpoint).await else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), health.check(request)).await,
        Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

async fn wait_serving(dialer: &Dialer, addr: SocketAddr) {
    eventually(
        &format!("{addr} to be SERVING over TLS"),
        Duration::from_secs(10),
        || health_answers(dialer, addr),
    )
    .await;
}

/// Replicas 0..n on reserved hosts, in DNS, each with `flags(i)`.
async fn cluster(hosts: Hosts, running: usize, flags: impl Fn(usize) -> Vec<String>) -> Cluster {
    let dns = DevDns::start(hosts.dns_ip(), ZONE).await.expect("dns starts");
    let mut cluster = Cluster {
        dns,
        replicas: (0..hosts.ips.len()).map(|_| None).collect(),
        hosts,
    };
    cluster.publish(&(0..running).collect::<Vec<_>>()).await;
    for i in 0..running {
        let flags = flags(i);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        cluster.start_replica(i, &flags);
    }
    cluster
}

fn broadcast(topic: &str, ack: AckPolicy) -> Request<BroadcastRequest> {
    broadcast_with_id(topic, ack, "")
}

fn broadcast_with_id(topic: &str, ack: AckPolicy, id: &str) -> Request<BroadcastRequest> {
    let mut request = Request::new(BroadcastRequest {
        topic: topic.into(),
        payload: b"hello".to_vec().into(),
        ack: ack as i32,
        id: id.into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(5));
    request
}

#[tokio::test]
async fn three_replicas_broadcast_over_mtls_and_refuse_plaintext() {
    let ca = Ca::new("workload CA");
    let secret = SecretDir::new(&ca.replica(IDENTITY), &ca.pem());
    let hosts = Hosts::reserve(3).await;
    let metrics = free_port_on(hosts.ips[0]).await;
    let probe_port = free_port_on(hosts.ips[0]).await;
    let cluster = cluster(hosts, 3, |i| {
        let mut flags = secret.flags();
        if i == 0 {
            flags.extend([
                "--metrics-listen".into(),
                metrics.to_string(),
                "--health-listen".into(),
                probe_port.to_string(),
            ]);
        }
        flags
    })
    .await;
    let client_tls = dialer(&ca.pem(), None);
    for i in 0..3 {
        wait_serving(&client_tls, cluster.addr(i)).await;
    }

    let mut streams = Vec::new();
    for i in 0..3 {
        let mut client = connect(&client_tls, cluster.addr(i)).await.unwrap();
        let request = SubscribeRequest {
            topics: vec!["cache".into()],
            ..Default::default()
        };
        streams.push(client.subscribe(request).await.unwrap().into_inner());
    }
    let mut client = connect(&client_tls, cluster.addr(0)).await.unwrap();
    let response = client
        .broadcast(broadcast("cache", AckPolicy::All))
        .await
        .expect("Broadcast over mTLS")
        .into_inner();
    assert_eq!((response.replicas, response.acked), (3, 3), "{response:?}");
    for stream in &mut streams {
        let delivery = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap();
        assert_eq!(delivery.message.unwrap().id, response.id);
    }

    // Every connection to the port is TLS: a plaintext client gets nothing.
    assert!(!health_answers(&Dialer::Plain, cluster.addr(0)).await);
    // The probe port answers health in plaintext (kubelet probes cannot
    // speak TLS), and nothing else.
    assert!(health_answers(&Dialer::Plain, probe_port).await);
    let mut probe_client = connect(&Dialer::Plain, probe_port).await.unwrap();
    let status = probe_client
        .broadcast(broadcast("cache", AckPolicy::All))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    eventually(
        "the plaintext handshake to be counted",
        Duration::from_secs(5),
        || async {
            samples(&scrape(metrics).await)
                .get("replicast_tls_handshake_failures_total{reason=\"not_tls\"}")
                .is_some_and(|n| *n >= 1.0)
        },
    )
    .await;
    let metrics = samples(&scrape(metrics).await);
    assert!(
        metrics["replicast_tls_certificate_expiry_timestamp_seconds"] > 4.0e10,
        "{metrics:?}"
    );
    cluster.shutdown().await;
}

/// A TLS listener presenting `leaf` that does nothing else: the expired
/// peer (a replica would refuse to start with an expired certificate).
fn tls_only_peer(listener: tokio::net::TcpListener, leaf: &Leaf) -> tokio::task::JoinHandle<()> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _held = acceptor.accept(tcp).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    })
}

#[tokio::test]
async fn peers_that_cannot_prove_the_identity_are_refused_and_named_in_receipts() {
    let ca = Ca::new("workload CA");
    let other_ca = Ca::new("someone else's CA");
    let good = SecretDir::new(&ca.replica(IDENTITY), &ca.pem());
    let foreign = SecretDir::new(&other_ca.replica(IDENTITY), &other_ca.pem());
    let intruder_identity = "spiffe://cluster.local/ns/test/sa/intruder";
    let intruder = SecretDir::new(&ca.replica(intruder_identity), &ca.pem());

    let mut hosts = Hosts::reserve(7).await;
    let expired_listener = hosts.listeners[4].take().unwrap();
    let (expired_addr, plaintext_addr) = (hosts.addr(4), hosts.addr(6));
    let (foreign_addr, intruder_addr) = (hosts.addr(3), hosts.addr(5));
    let expired_peer = tls_only_peer(expired_listener, &ca.expired());
    let dns = DevDns::start(hosts.dns_ip(), ZONE).await.unwrap();
    let mut cluster = Cluster {
        dns,
        replicas: (0..7).map(|_| None).collect(),
        hosts,
    };
    cluster.publish(&(0..7).collect::<Vec<_>>()).await;
    for i in [0, 1, 2, 3, 5, 6] {
        let flags = match i {
            3 => foreign.flags(),
            5 => {
                let mut flags = intruder.flags();
                *flags.last_mut().unwrap() = intruder_identity.into();
                flags
            }
            6 => vec![],
            _ => good.flags(),
        };
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        cluster.start_replica(i, &flags);
    }
    let client_tls = dialer(&ca.pem(), None);
    for i in 0..3 {
        wait_serving(&client_tls, cluster.addr(i)).await;
    }

    let mut client = connect(&client_tls, cluster.addr(0)).await.unwrap();
    let status = client
        .broadcast(broadcast("cache", AckPolicy::All))
        .await
        .expect_err("four of seven replicas cannot be reached over mTLS");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let response = broadcast_response_from_status(&status).expect("receipts in the details");
    let receipts: HashMap<String, (i32, String)> = response
        .outcomes
        .iter()
        .map(|o| (o.peer.clone(), (o.code, o.message.clone())))
        .collect();
    for good in 0..3 {
        assert_eq!(receipts[&cluster.addr(good).to_string()].0, 0, "{receipts:#?}");
    }
    let refused = |addr: SocketAddr, why: &[&str]| {
        let (code, message) = &receipts[&addr.to_string()];
        assert_ne!(*code, 0, "{addr} must be refused: {receipts:#?}");
        assert!(
            why.iter().any(|w| message.contains(w)),
            "the receipt of {addr} should say one of {why:?}: {message}"
        );
    };
    refused(foreign_addr, &["UnknownIssuer"]);
    refused(expired_addr, &["expired", "Expired"]);
    refused(intruder_addr, &["not the workload identity", intruder_identity]);
    refused(plaintext_addr, &["does not speak TLS", "closed the connection"]);

    expired_peer.abort();
    cluster.shutdown().await;
}

#[tokio::test]
async fn peer_rpcs_are_served_only_to_the_workload_identity() {
    let ca = Ca::new("workload CA");
    let other_ca = Ca::new("someone else's CA");
    let secret = SecretDir::new(&ca.replica(IDENTITY), &ca.pem());
    let mut hosts = Hosts::reserve(2).await;
    // A second replica that asks every client for a certificate.
    let strict_listener = hosts.listeners[1].take().unwrap();
    let strict_addr = hosts.addr(1);
    let metrics = free_port_on(hosts.ips[0]).await;
    let cluster = cluster(hosts, 1, |_| {
        let mut flags = secret.flags();
        flags.extend(["--metrics-listen".into(), metrics.to_string()]);
        flags
    })
    .await;
    let addr = cluster.addr(0);
    let anonymous = dialer(&ca.pem(), None);
    wait_serving(&anonymous, addr).await;

    let deliver = || {
        Request::new(DeliverRequest {
            message: Some(Message {
                id: "injected".into(),
                topic: "cache".into(),
                origin: "127.9.9.9:1".into(),
                ..Default::default()
            }),
        })
    };
    let frames = || {
        Request::new(futures::stream::iter([DeliverFrame {
            tag: 1,
            message: Some(Message {
                id: "injected".into(),
                topic: "cache".into(),
                origin: "127.9.9.9:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }]))
    };
    let identify = || {
        Request::new(AnnounceRequest {
            kind: Kind::Identify as i32,
            ..Default::default()
        })
    };

    // No client certificate: a client, not a peer.
    let mut client = connect(&anonymous, addr).await.unwrap();
    for status in [
        client.deliver(deliver()).await.unwrap_err(),
        client.deliver_stream(frames()).await.unwrap_err(),
        client.announce(identify()).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains(IDENTITY), "{status:?}");
    }
    // A client may still Broadcast.
    client
        .broadcast(broadcast("cache", AckPolicy::All))
        .await
        .unwrap();

    // A certificate from the CA without the identity.
    let other_service = "spiffe://cluster.local/ns/test/sa/web";
    let web = dialer(&ca.pem(), Some(&ca.replica(other_service)));
    let mut client = connect(&web, addr).await.unwrap();
    for status in [
        client.deliver(deliver()).await.unwrap_err(),
        client.deliver_stream(frames()).await.unwrap_err(),
        client.announce(identify()).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(IDENTITY) && status.message().contains(other_service),
            "{status:?}"
        );
    }

    // A peer with the identity is served.
    let peer = dialer(&ca.pem(), Some(&ca.replica(IDENTITY)));
    let mut client = connect(&peer, addr).await.unwrap();
    let delivered = client
        .deliver(deliver())
        .await
        .expect("a peer may Deliver")
        .into_inner();
    assert_eq!(delivered.id, "injected");
    client.announce(identify()).await.expect("a peer may Announce");

    // A certificate from another CA fails the handshake.
    let foreign = dialer(&ca.pem(), Some(&other_ca.replica(IDENTITY)));
    assert!(!health_answers(&foreign, addr).await);
    eventually(
        "the foreign certificate to be counted",
        Duration::from_secs(5),
        || async {
            samples(&scrape(metrics).await)
                .get("replicast_tls_handshake_failures_total{reason=\"client_certificate\"}")
                .is_some_and(|n| *n >= 1.0)
        },
    )
    .await;

    // --tls-client-certs required: no certificate, no connection.
    let mut args = common::base_args(strict_addr, cluster.dns.addr());
    args.extend(secret.flags());
    args.extend(["--tls-client-certs".into(), "required".into()]);
    let strict = ServerHandle::start_on(common::config(args), strict_listener);
    wait_serving(&peer, strict_addr).await;
    assert!(!health_answers(&anonymous, strict_addr).await);
    strict.shutdown().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_replica_refuses_to_start_with_material_that_cannot_work() {
    let ca = Ca::new("workload CA");
    let other_ca = Ca::new("someone else's CA");
    let mismatched = Leaf {
        key: ca.replica(IDENTITY).key,
        ..ca.replica(IDENTITY)
    };
    let server_only = ca.leaf(|params| {
        params.subject_alt_names = vec![rcgen::SanType::URI(IDENTITY.try_into().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    let cases = [
        (ca.expired(), ca.pem(), "expired"),
        (
            ca.replica("spiffe://cluster.local/ns/test/sa/web"),
            ca.pem(),
            "does not hold the workload identity",
        ),
        (mismatched, ca.pem(), "does not match"),
        (ca.replica(IDENTITY), other_ca.pem(), "does not chain to --tls-ca"),
        (server_only, ca.pem(), "client auth"),
    ];
    for (leaf, ca_pem, expected) in cases {
        let secret = SecretDir::new(&leaf, &ca_pem);
        let mut args = ["--listen", "127.0.0.1:0", "--advertise", "127.0.0.1:9"]
            .map(String::from)
            .to_vec();
        args.extend(secret.flags());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let replica = ServerHandle::start_on(common::config(args), listener);
        let error = replica.shutdown().await.expect_err("the replica must not start");
        assert!(
            error.to_string().contains(expected),
            "{expected:?} not in: {error}"
        );
    }
}

#[tokio::test]
async fn certificates_and_ca_rotate_under_load_without_a_failed_broadcast() {
    let old_ca = Ca::new("CA 2026");
    let new_ca = Ca::new("CA 2027");
    let both = format!("{}{}", old_ca.pem(), new_ca.pem());
    let mut secrets: Vec<SecretDir> = (0..3)
        .map(|_| SecretDir::new(&old_ca.replica(IDENTITY), &old_ca.pem()))
        .collect();
    let hosts = Hosts::reserve(3).await;
    let mut metrics = Vec::new();
    for i in 0..3 {
        metrics.push(free_port_on(hosts.ips[i]).await);
    }
    let cluster = cluster(hosts, 3, |i| {
        let mut flags = secrets[i].flags();
        flags.extend([
            "--metrics-listen".into(),
            metrics[i].to_string(),
            // Connections made with old material are replaced as it goes.
            "--max-connection-age".into(),
            "2s".into(),
        ]);
        flags
    })
    .await;
    let loader_tls = dialer(&both, None);
    for i in 0..3 {
        wait_serving(&loader_tls, cluster.addr(i)).await;
    }

    // Load: ack=ALL Broadcasts through every replica, all the time. A
    // call that fails because its connection closed under it (the
    // connection age) is retried with the same id, as the README tells
    // clients to: the replicas deliver it once either way.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, retried) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut loaders = Vec::new();
    for i in 0..3 {
        let mut client = connect(&loader_tls, cluster.addr(i)).await.unwrap();
        let (stop, sent, retried) = (stop.clone(), sent.clone(), retried.clone());
        loaders.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("rotation-{i}-{n}");
                let mut attempts = 0;
                let outcome = loop {
                    attempts += 1;
                    match client
                        .broadcast(broadcast_with_id("cache", AckPolicy::All, &id))
                        .await
                    {
                        Err(status) if attempts < 3 && is_connection_closed(&status) => {
                            retried.fetch_add(1, Ordering::Relaxed);
                        }
                        other => break other,
                    }
                };
                match outcome {
                    Ok(response) if response.get_ref().acked == 3 => {}
                    Ok(response) => failures.push(format!("{:?}", response.into_inner())),
                    Err(status) => failures.push(format!("{status:?}")),
                }
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failures
        }));
    }
    let reloads = |addr: SocketAddr, result: &'static str, at_least: f64| async move {
        let what = format!("{addr}: {at_least} TLS reloads {result}");
        eventually(&what, Duration::from_secs(10), || async move {
            samples(&scrape(addr).await)
                .get(&format!("replicast_tls_reloads_total{{result=\"{result}\"}}"))
                .is_some_and(|n| *n >= at_least)
        })
        .await;
    };
    let settle = || tokio::time::sleep(Duration::from_millis(1500));
    settle().await;

    // 1. Every replica trusts both CAs.
    for secret in &mut secrets {
        secret.update(&old_ca.replica(IDENTITY), &both);
    }
    for addr in &metrics {
        reloads(*addr, "loaded", 1.0).await;
    }
    settle().await;
    // 2. One by one, each replica gets a certificate from the new CA.
    for (i, secret) in secrets.iter_mut().enumerate() {
        secret.update(&new_ca.replica(IDENTITY), &both);
        reloads(metrics[i], "loaded", 2.0).await;
        let new_only = dialer(&new_ca.pem(), None);
        let addr = cluster.addr(i);
        eventually(
            "new connections to get the new certificate",
            Duration::from_secs(5),
            || health_answers(&new_only, addr),
        )
        .await;
        settle().await;
    }
    // 3. The old CA is dropped: a certificate from it no longer connects.
    for (i, secret) in secrets.iter_mut().enumerate() {
        secret.update(&new_ca.replica(IDENTITY), &new_ca.pem());
        reloads(metrics[i], "loaded", 3.0).await;
    }
    let old_client = dialer(&both, Some(&old_ca.replica(IDENTITY)));
    for i in 0..3 {
        assert!(
            !health_answers(&old_client, cluster.addr(i)).await,
            "replica {i} still trusts the old CA"
        );
    }
    settle().await;
    // 4. A broken update (a key that does not match) is refused; the
    //    replica keeps serving with what it has.
    let mismatched = Leaf {
        key: new_ca.replica(IDENTITY).key,
        ..new_ca.replica(IDENTITY)
    };
    secrets[0].update(&mismatched, &new_ca.pem());
    reloads(metrics[0], "rejected", 1.0).await;
    assert!(health_answers(&dialer(&new_ca.pem(), None), cluster.addr(0)).await);
    settle().await;

    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for loader in loaders {
        failures.extend(loader.await.unwrap());
    }
    let (sent, retried) = (sent.load(Ordering::Relaxed), retried.load(Ordering::Relaxed));
    eprintln!(
        "rotation under load: {sent} ack=ALL Broadcasts, {retried} retried after their connection closed, {} failed",
        failures.len()
    );
    assert!(sent > 300, "the load ran ({sent} Broadcasts)");
    assert!(
        failures.is_empty(),
        "{} failed: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    cluster.shutdown().await;
}

/// The call failed because its connection went away before an answer
/// (not a replicast status): it may be retried with the same id.
fn is_connection_closed(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unknown | Code::Unavailable) && status.message().contains("transport error")
}

/// A secret whose files live in a directory the reload task does not
/// watch (the path given is a symlink into it), so only the poll or SIGHUP
/// can find a change.
struct UnwatchedFiles {
    watched: std::path::PathBuf,
    real: std::path::PathBuf,
}

impl UnwatchedFiles {
    fn new(leaf: &Leaf, ca: &str) -> Self {
        let base = std::env::temp_dir().join(format!("replicast-unwatched-{}", rand::random::<u32>()));
        let (watched, real) = (base.join("watched"), base.join("real"));
        std::fs::create_dir_all(&watched).unwrap();
        std::fs::create_dir_all(&real).unwrap();
        let files = Self { watched, real };
        files.write(leaf, ca);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(files.real.join(name), files.watched.join(name)).unwrap();
        }
        files
    }

    fn write(&self, leaf: &Leaf, ca: &str) {
        std::fs::write(self.real.join("tls.crt"), &leaf.cert).unwrap();
        std::fs::write(self.real.join("tls.key"), &leaf.key).unwrap();
        std::fs::write(self.real.join("ca.crt"), ca).unwrap();
    }

    fn source(&self, poll_interval: Duration) -> TlsSource {
        TlsSource {
            cert: self.watched.join("tls.crt"),
            key: self.watched.join("tls.key"),
            ca: self.watched.join("ca.crt"),
            identity: IDENTITY.parse().unwrap(),
            client_certs: ClientCerts::Optional,
            poll_interval,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

impl Drop for UnwatchedFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.real.parent().unwrap());
    }
}

#[tokio::test]
async fn changes_the_watch_cannot_see_are_found_by_the_poll_and_by_sighup() {
    let ca = Ca::new("workload CA");
    let (phase_tx, phase) = lifecycle();

    // The poll finds a change within its interval.
    let polled = UnwatchedFiles::new(&ca.replica(IDENTITY), &ca.pem());
    let tls_metrics = TlsMetrics::default();
    let (mut configs, polling) = spawn_tls_reload(
        polled.source(Duration::from_millis(300)),
        tls_metrics.clone(),
        phase.clone(),
    )
    .await
    .unwrap();
    configs.server.mark_unchanged();
    polled.write(&ca.replica(IDENTITY), &ca.pem());
    tokio::time::timeout(Duration::from_secs(5), configs.server.changed())
        .await
        .expect("the poll reloads within its interval")
        .unwrap();

    // SIGHUP reloads at once, with no poll for an hour.
    let hup = UnwatchedFiles::new(&ca.replica(IDENTITY), &ca.pem());
    let (mut configs, hanging_up) = spawn_tls_reload(
        hup.source(Duration::from_secs(3600)),
        TlsMetrics::default(),
        phase.clone(),
    )
    .await
    .unwrap();
    configs.server.mark_unchanged();
    hup.write(&ca.replica(IDENTITY), &ca.pem());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !configs.server.has_changed().unwrap(),
        "nothing but SIGHUP can see this change"
    );
    // The reload task listens for SIGHUP by now (it did before its first
    // poll), so the signal cannot end the test process.
    unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    tokio::time::timeout(Duration::from_secs(5), configs.server.changed())
        .await
        .expect("SIGHUP reloads at once")
        .unwrap();

    phase_tx.advance(Phase::Closing);
    polling.await.unwrap();
    hanging_up.await.unwrap();
}
