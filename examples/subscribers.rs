//! Many Subscribe streams on one replica: how long until the last of them
//! has a message, how many keep up, and the replica's resident memory.
//!
//!     cargo run --release -- serve --listen 127.0.0.1:7420 --max-subscribers-per-client 0 &
//!     cargo run --release --example subscribers -- --to 127.0.0.1:7420 \
//!         --subscribers 10000 --rate 1000 --duration 10s --pid $(pgrep -f 'replicast serve')
//!
//! Subscribers share `--streams-per-connection` streams per HTTP/2
//! connection (servers cap concurrent streams per connection). The publisher
//! sends `--rate` unary Broadcasts a second (ack ONE), each carrying its
//! sequence number in the payload. Loopback only; every loop is bounded by
//! `--duration`. All the streams come from one address, so the replica must
//! not limit Subscribe streams per client (`--max-subscribers-per-client 0`).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use replicast::proto::v1::{
    AckPolicy, BroadcastRequest, SubscribeRequest, replicast_client::ReplicastClient,
};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
struct Args {
    /// The replica.
    #[arg(long, default_value = "127.0.0.1:7420")]
    to: String,
    /// Subscribe streams to open.
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// Broadcasts per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Subscribe streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// The replica's pid, to read its resident memory from /proc.
    #[arg(long)]
    pid: Option<u32>,
}

const TOPIC: &str = "subscribers.bench";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let total = (args.rate * args.duration.as_secs().max(1)) as usize;
    // Per message: subscribers that have it, and when the last one did.
    let counts: Arc<Vec<AtomicU32>> = Arc::new((0..total).map(|_| AtomicU32::new(0)).collect());
    let complete: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let attached = Arc::new(AtomicUsize::new(0));
    let cut_off = Arc::new(AtomicUsize::new(0));

    let connections = args.subscribers.div_ceil(args.streams_per_connection.max(1));
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(connect(&args.to).await?);
    }
    let rss_before = rss(args.pid);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.subscribers {
        let mut client = ReplicastClient::new(channels[i % connections].clone());
        let (counts, complete, attached, cut_off) = (
            counts.clone(),
            complete.clone(),
            attached.clone(),
            cut_off.clone(),
        );
        let subscribers = args.subscribers as u32;
        tasks.spawn(async move {
            let request = SubscribeRequest {
                topics: vec![TOPIC.into()],
                ..Default::default()
            };
            let Ok(response) = client.subscribe(request).await else {
                cut_off.fetch_add(1, Ordering::Relaxed);
                return;
            };
            attached.fetch_add(1, Ordering::Relaxed);
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(delivery)) => {
                        let Some(seq) = delivery.message.and_then(|m| {
                            m.payload
                                .get(..8)
                                .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
                        }) else {
                            continue;
                        };
                        let Some(count) = counts.get(seq as usize) else {
                            continue;
                        };
                        if count.fetch_add(1, Ordering::Relaxed) + 1 == subscribers {
                            complete.lock().unwrap().push((seq as usize, Instant::now()));
                        }
                    }
                    Ok(None) => return,
                    Err(_) => {
                        cut_off.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while attached.load(Ordering::Relaxed) + cut_off.load(Ordering::Relaxed) < args.subscribers {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_attached = rss(args.pid);
    println!(
        "{} of {} subscribers attached over {connections} connections; replica RSS {} -> {} MB",
        attached.load(Ordering::Relaxed),
        args.subscribers,
        mb(rss_before),
        mb(rss_attached)
    );

    let publisher = ReplicastClient::new(connect(&args.to).await?);
    let mut sent = vec![None; total];
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate.max(1) as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut peak_rss = rss_attached;
    for (seq, slot) in sent.iter_mut().enumerate() {
        tick.tick().await;
        let mut client = publisher.clone();
        let mut payload = vec![0u8; 64];
        payload[..8].copy_from_slice(&(seq as u64).to_be_bytes());
        *slot = Some(Instant::now());
        tokio::spawn(async move {
            let _ = client
                .broadcast(BroadcastRequest {
                    topic: TOPIC.into(),
                    payload: payload.into(),
                    ack: AckPolicy::One as i32,
                    ..Default::default()
                })
                .await;
        });
        if seq % args.rate.max(1) as usize == 0 {
            peak_rss = peak_rss.max(rss(args.pid));
        }
    }
    let published = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    peak_rss = peak_rss.max(rss(args.pid));
    tasks.abort_all();

    let complete = complete.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = complete
        .iter()
        .filter_map(|(seq, at)| sent[*seq].map(|s| at.saturating_duration_since(s)))
        .collect();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or("-".to_owned(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
    };
    println!(
        "published {total} in {published:.1?} ({:.0}/s); {} reached every subscriber: \
         until the last one had it p50 {} p99 {} max {}; {} subscribers cut off; replica peak RSS {} MB",
        total as f64 / published.as_secs_f64(),
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        cut_off.load(Ordering::Relaxed),
        mb(peak_rss)
    );
    Ok(())
}

async fn connect(to: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{to}"))?
        .tcp_nodelay(true)
        .connect()
        .await
}

/// Resident memory of `pid`, in kB.
fn rss(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn mb(kb: u64) -> String {
    format!("{:.0}", kb as f64 / 1024.0)
}
