//! `replicast bench`: a load generator in the spirit of `redis-benchmark` and
//! `nats bench`.
//!
//! It subscribes on every replica the target lists in ListPeers, then runs a
//! closed loop with K Broadcasts in flight for each K asked for, and measures
//! two latencies per message: the Broadcast round trip (receipts back) and
//! the time until a subscriber on every replica has the message. K = 1 is
//! the sequential latency.

use std::{
    collections::HashMap,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tonic::Request;

use crate::tls::Dialer;

use super::{CliError, client::AckArg, connect};
use crate::proto::v1::{
    AckPolicy, BroadcastRequest, ListPeersRequest, PublishRequest, PublishResponse, SubscribeRequest,
};

/// Header carrying the bench sequence number, so subscribers can match.
const SEQ_HEADER: &str = "bench-seq";

/// `replicast bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Replica to send Broadcasts to.
    #[arg(long, env = "REPLICAST_TO", default_value = "127.0.0.1:7420")]
    pub to: String,
    #[command(flatten)]
    pub tls: crate::config::TlsFlags,
    /// Broadcasts in flight; one table row each (1 = sequential latency).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub in_flight: Vec<usize>,
    /// Measured time per row.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before each row, with the pipeline full.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Ack policy of every Broadcast.
    #[arg(long, value_enum, default_value = "all")]
    pub ack: AckArg,
    /// Topic to publish on (subscribers filter on it).
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// How messages are sent: one unary Broadcast each, or all on one
    /// Publish stream.
    #[arg(long, value_enum, default_value = "broadcast")]
    pub api: Api,
}

/// `--api` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    Broadcast,
    Publish,
}

/// Sends one message and says whether its ack policy was met.
#[derive(Debug, Clone)]
enum Sender {
    Unary(super::Client),
    Publish(Arc<Publisher>),
}

impl Sender {
    async fn send(&mut self, seq: u64, broadcast: BroadcastRequest, timeout: Duration) -> bool {
        match self {
            Self::Unary(client) => {
                let mut request = Request::new(broadcast);
                request.set_timeout(timeout);
                client.broadcast(request).await.is_ok()
            }
            Self::Publish(publisher) => publisher.send(seq, broadcast, timeout).await,
        }
    }
}

/// One Publish stream shared by every worker: tag = the bench sequence.
#[derive(Debug)]
struct Publisher {
    request_tx: mpsc::Sender<PublishRequest>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<PublishResponse>>>>,
}

impl Publisher {
    async fn open(mut client: super::Client) -> Result<Arc<Self>, CliError> {
        let (request_tx, request_rx) = mpsc::channel(1024);
        let mut responses = client
            .publish(tokio_stream::wrappers::ReceiverStream::new(request_rx))
            .await?
            .into_inner();
        let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<PublishResponse>>>> = Arc::default();
        let dispatch = waiting.clone();
        // Ends with the stream, when the bench drops the request sender.
        tokio::spawn(async move {
            while let Ok(Some(response)) = responses.message().await {
                let waiter = dispatch
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&response.tag);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(response);
                }
            }
        });
        Ok(Arc::new(Self { request_tx, waiting }))
    }

    async fn send(&self, tag: u64, broadcast: BroadcastRequest, timeout: Duration) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tag, done_tx);
        let request = PublishRequest {
            tag,
            broadcast: Some(broadcast),
            timeout: prost_types::Duration::try_from(timeout).ok(),
        };
        if self.request_tx.send(request).await.is_err() {
            return false;
        }
        matches!(done_rx.await, Ok(response) if response.code == 0)
    }
}

/// Messages sent and not yet seen by every subscriber.
#[derive(Debug, Default)]
struct Arrivals {
    waiting: Mutex<HashMap<u64, Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    remaining: usize,
    done_tx: Option<oneshot::Sender<Instant>>,
}

impl Arrivals {
    fn expect(&self, seq: u64, subscribers: usize) -> oneshot::Receiver<Instant> {
        let (done_tx, done_rx) = oneshot::channel();
        self.lock().insert(
            seq,
            Waiter {
                remaining: subscribers,
                done_tx: Some(done_tx),
            },
        );
        done_rx
    }

    fn arrived(&self, seq: u64, at: Instant) {
        let mut waiting = self.lock();
        let Some(waiter) = waiting.get_mut(&seq) else {
            return;
        };
        waiter.remaining = waiter.remaining.saturating_sub(1);
        if waiter.remaining == 0 {
            if let Some(done_tx) = waiter.done_tx.take() {
                let _ = done_tx.send(at);
            }
            waiting.remove(&seq);
        }
    }

    fn forget(&self, seq: u64) {
        self.lock().remove(&seq);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One completed message.
#[derive(Debug, Clone, Copy)]
struct Sample {
    finished: Instant,
    round_trip: Duration,
    /// `None` when not every subscriber saw it within 5 s.
    delivered: Option<Duration>,
    ok: bool,
}

/// Runs the benchmark and prints a table.
pub async fn run(args: BenchArgs) -> Result<ExitCode, CliError> {
    let mut client = connect(&args.to).await?;
    let peers = client.list_peers(ListPeersRequest {}).await?.into_inner();
    let replicas: Vec<String> = peers.peers.iter().map(|p| p.address.clone()).collect();
    let arrivals = Arc::new(Arrivals::default());

    let mut subscribers = JoinSet::new();
    for address in &replicas {
        let mut sub_client = connect(address).await?;
        let mut stream = sub_client
            .subscribe(SubscribeRequest {
                topics: vec![args.topic.clone()],
                after_sequence: 0,
                incarnation: 0,
                from_oldest: false,
            })
            .await?
            .into_inner();
        let arrivals = arrivals.clone();
        let address = address.clone();
        subscribers.spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(delivery)) => {
                        let now = Instant::now();
                        let seq = delivery
                            .message
                            .as_ref()
                            .and_then(|m| m.headers.get(SEQ_HEADER))
                            .and_then(|s| s.parse().ok());
                        if let Some(seq) = seq {
                            arrivals.arrived(seq, now);
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        eprintln!("subscriber on {address} ended: {}", status.message());
                        return;
                    }
                }
            }
        });
    }

    let sender = match args.api {
        Api::Broadcast => Sender::Unary(client.clone()),
        Api::Publish => Sender::Publish(Publisher::open(client.clone()).await?),
    };
    println!(
        "replicast bench: {} replicas via {} ({}), payload {} B, ack {}, {} per row after {} warm-up",
        replicas.len(),
        args.to,
        if args.api == Api::Publish {
            "one Publish stream"
        } else {
            "unary Broadcast"
        },
        args.payload,
        AckPolicy::from(args.ack)
            .as_str_name()
            .trim_start_matches("ACK_POLICY_"),
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
    );
    println!();
    println!(
        "| in flight | messages | msg/s | broadcast p50 | p99 | max | on every replica p50 | p99 | max | errors | health p50 | health p99 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let next_seq = Arc::new(AtomicU64::new(0));
    for &in_flight in &args.in_flight {
        let row = run_row(
            &args,
            &sender,
            &arrivals,
            &next_seq,
            replicas.len(),
            in_flight.max(1),
        )
        .await;
        println!("{row}");
    }
    subscribers.abort_all();
    Ok(ExitCode::SUCCESS)
}

async fn run_row(
    args: &BenchArgs,
    sender: &Sender,
    arrivals: &Arc<Arrivals>,
    next_seq: &Arc<AtomicU64>,
    subscribers: usize,
    in_flight: usize,
) -> String {
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let stop_at = measure_from + args.duration;
    let payload = bytes::Bytes::from(vec![b'x'; args.payload]);
    let mut workers = JoinSet::new();
    for _ in 0..in_flight {
        let mut sender = sender.clone();
        let arrivals = arrivals.clone();
        let next_seq = next_seq.clone();
        let payload = payload.clone();
        let topic = args.topic.clone();
        let ack = AckPolicy::from(args.ack) as i32;
        workers.spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < stop_at {
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                let done_rx = arrivals.expect(seq, subscribers);
                let request = BroadcastRequest {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    headers: HashMap::from([(SEQ_HEADER.to_owned(), seq.to_string())]),
                    id: String::new(),
                    ack,
                };
                let sent = Instant::now();
                let ok = sender.send(seq, request, Duration::from_secs(5)).await;
                let round_trip = sent.elapsed();
                let delivered = match tokio::time::timeout(Duration::from_secs(5), done_rx).await {
                    Ok(Ok(at)) => Some(at.saturating_duration_since(sent)),
                    _ => {
                        arrivals.forget(seq);
                        None
                    }
                };
                samples.push(Sample {
                    finished: Instant::now(),
                    round_trip,
                    delivered,
                    ok,
                });
            }
            samples
        });
    }
    // Meanwhile, a health check every 10 ms on a connection of its own, as
    // a kubelet probe would: how fast does the replica answer under load?
    let health = tokio::spawn(probe_health(args.to.clone(), measure_from, stop_at));
    let mut samples = Vec::new();
    while let Some(Ok(mut worker_samples)) = workers.join_next().await {
        samples.append(&mut worker_samples);
    }
    let mut health = health.await.unwrap_or_default();
    health.sort();
    let measured: Vec<Sample> = samples
        .into_iter()
        .filter(|s| s.finished >= measure_from && s.finished <= stop_at)
        .collect();
    let errors = measured.iter().filter(|s| !s.ok || s.delivered.is_none()).count();
    let mut round_trips: Vec<Duration> = measured.iter().map(|s| s.round_trip).collect();
    let mut delivered: Vec<Duration> = measured.iter().filter_map(|s| s.delivered).collect();
    round_trips.sort();
    delivered.sort();
    let rate = measured.len() as f64 / args.duration.as_secs_f64();
    format!(
        "| {in_flight} | {} | {rate:.0} | {} | {} | {} | {} | {} | {} | {errors} | {} | {} |",
        measured.len(),
        micros(percentile(&round_trips, 0.50)),
        micros(percentile(&round_trips, 0.99)),
        micros(round_trips.last().copied()),
        micros(percentile(&delivered, 0.50)),
        micros(percentile(&delivered, 0.99)),
        micros(delivered.last().copied()),
        micros(percentile(&health, 0.50)),
        micros(percentile(&health, 0.99)),
    )
}

/// grpc.health.v1 Check latencies between `from` and `until`.
async fn probe_health(to: String, from: Instant, until: Instant) -> Vec<Duration> {
    let dialer = super::DIALER.get().cloned().unwrap_or_default();
    let Ok(endpoint) = Dialer::endpoint(&to) else {
        return Vec::new();
    };
    let Ok(channel) = dialer.connect(endpoint).await else {
        return Vec::new();
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while Instant::now() < until {
        tick.tick().await;
        let sent = Instant::now();
        let answered = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok();
        if answered && sent >= from {
            latencies.push(sent.elapsed());
        }
    }
    latencies
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn micros(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{} µs", d.as_micros()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 0.50), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&ms, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&ms[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn arrivals_complete_after_every_subscriber() {
        let arrivals = Arrivals::default();
        let mut done = arrivals.expect(7, 2);
        arrivals.arrived(7, Instant::now());
        assert!(done.try_recv().is_err(), "one of two subscribers is not all");
        arrivals.arrived(7, Instant::now());
        assert!(done.try_recv().is_ok());
    }
}
