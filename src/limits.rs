//! Limits that keep one client from hurting the others: Subscribe streams
//! per replica and per client, and a per-client Broadcast rate (a token
//! bucket). A client is its token's name when tokens are on, its IP address
//! otherwise. The HTTP/2 limits (streams per connection, header list size,
//! keepalive, connection age) are the server's settings (`server.rs`).
//!
//! Both tables are touched once per Subscribe call and once per Broadcast
//! (a lock held for a few instructions, never across an await); both are
//! bounded: a client's entry goes when it has no stream open or its bucket
//! is full again.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::error::Error;

/// Who a limit counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The client named by its token.
    Named(Arc<str>),
    /// A client without a token, by the address it calls from.
    Address(IpAddr),
    /// Neither is known (a test transport).
    Unknown,
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Named(name) => write!(f, "client {name}"),
            Self::Address(ip) => write!(f, "the client at {ip}"),
            Self::Unknown => f.write_str("this client"),
        }
    }
}

/// The limits' settings, from the configuration (0 turns a limit off).
#[derive(Debug, Clone, Copy)]
pub struct LimitsConfig {
    pub max_subscribers: usize,
    pub max_subscribers_per_client: usize,
    /// Broadcasts per second per client (each Publish message counts).
    pub broadcast_rate_per_client: u32,
    /// The longest deadline a caller may ask for.
    pub max_deadline: Duration,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Whether the bucket is full again (its client has been quiet).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }
}

#[derive(Debug, Default)]
struct Subscribers {
    total: usize,
    per_client: HashMap<ClientKey, usize>,
}

/// The shared limit state of one replica.
#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    subscribers: Mutex<Subscribers>,
    buckets: Mutex<HashMap<ClientKey, TokenBucket>>,
}

/// Clients with a bucket at most; beyond, full buckets are dropped first.
const MAX_BUCKETS: usize = 10_000;

impl Limits {
    pub fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            subscribers: Mutex::new(Subscribers::default()),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one more Subscribe stream of `client`, until the returned slot
    /// is dropped (with the stream).
    pub fn admit_subscriber(self: &Arc<Self>, client: ClientKey) -> Result<SubscriberSlot, Error> {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        let max = self.config.max_subscribers;
        if max > 0 && subscribers.total >= max {
            return Err(Error::LimitReached {
                flag: "--max-subscribers",
                detail: format!(
                    "{max} Subscribe streams are open on this replica; subscribe to another replica or retry later"
                ),
            });
        }
        let per_client = self.config.max_subscribers_per_client;
        let open = subscribers.per_client.get(&client).copied().unwrap_or(0);
        if per_client > 0 && open >= per_client {
            return Err(Error::LimitReached {
                flag: "--max-subscribers-per-client",
                detail: format!("{client} already has {open} Subscribe streams open on this replica"),
            });
        }
        subscribers.total += 1;
        *subscribers.per_client.entry(client.clone()).or_default() += 1;
        Ok(SubscriberSlot {
            limits: self.clone(),
            client,
        })
    }

    /// Takes one Broadcast from `client`'s rate.
    pub fn admit_broadcast(&self, client: &ClientKey, now: Instant) -> Result<(), Error> {
        let rate = self.config.broadcast_rate_per_client;
        if rate == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(client) {
            buckets.retain(|_, bucket| !bucket.is_full(now));
        }
        let bucket = buckets
            .entry(client.clone())
            .or_insert_with(|| TokenBucket::new(rate, rate, now));
        bucket.take(now).map_err(|retry_after| Error::LimitReached {
            flag: "--broadcast-rate-per-client",
            detail: format!(
                "{client} sent more than {rate} Broadcasts a second; retry in {} ms",
                retry_after.as_millis().max(1)
            ),
        })
    }

    /// Refuses a caller's deadline beyond `--max-deadline`.
    pub fn check_deadline(&self, asked: Option<Duration>) -> Result<(), Error> {
        match asked {
            Some(asked) if asked > self.config.max_deadline => Err(Error::DeadlineTooLong {
                asked,
                max: self.config.max_deadline,
            }),
            _ => Ok(()),
        }
    }

    fn release_subscriber(&self, client: &ClientKey) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.total = subscribers.total.saturating_sub(1);
        if let Some(open) = subscribers.per_client.get_mut(client) {
            *open -= 1;
            if *open == 0 {
                subscribers.per_client.remove(client);
            }
        }
    }
}

/// One open Subscribe stream, counted until dropped.
#[derive(Debug)]
pub struct SubscriberSlot {
    limits: Arc<Limits>,
    client: ClientKey,
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.limits.release_subscriber(&self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_client: usize, rate: u32) -> Arc<Limits> {
        Limits::new(LimitsConfig {
            max_subscribers: max,
            max_subscribers_per_client: per_client,
            broadcast_rate_per_client: rate,
            max_deadline: Duration::from_secs(60),
        })
    }

    fn named(name: &str) -> ClientKey {
        ClientKey::Named(name.into())
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, 10, t0);
        for _ in 0..10 {
            bucket.take(t0).expect("the burst");
        }
        let wait = bucket.take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "one token every 100 ms at 10/s");
        assert!(bucket.take(t0 + Duration::from_millis(99)).is_err());
        assert!(bucket.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(!bucket.is_full(t0 + Duration::from_millis(500)));
        assert!(
            bucket.is_full(t0 + Duration::from_secs(2)),
            "never more than the burst"
        );
    }

    #[test]
    fn subscribers_are_counted_per_replica_and_per_client_until_dropped() {
        let l = limits(3, 2, 0);
        let a1 = l.admit_subscriber(named("a")).unwrap();
        let _a2 = l.admit_subscriber(named("a")).unwrap();
        let error = l.admit_subscriber(named("a")).unwrap_err();
        assert!(error.to_string().contains("client a already has 2"), "{error}");
        assert!(
            error.to_string().contains("--max-subscribers-per-client"),
            "{error}"
        );
        let _b1 = l.admit_subscriber(named("b")).unwrap();
        let error = l.admit_subscriber(named("c")).unwrap_err();
        assert!(error.to_string().contains("--max-subscribers:"), "{error}");
        drop(a1);
        l.admit_subscriber(named("a")).expect("a slot came free");
    }

    #[test]
    fn broadcasts_are_rate_limited_per_client() {
        let l = limits(0, 0, 2);
        let t0 = Instant::now();
        let a = named("a");
        l.admit_broadcast(&a, t0).unwrap();
        l.admit_broadcast(&a, t0).unwrap();
        let error = l.admit_broadcast(&a, t0).unwrap_err();
        assert!(
            error.to_string().contains("--broadcast-rate-per-client"),
            "{error}"
        );
        assert!(error.to_string().contains("client a sent more than 2"), "{error}");
        l.admit_broadcast(&named("b"), t0)
            .expect("another client has its own bucket");
        l.admit_broadcast(&a, t0 + Duration::from_millis(500))
            .expect("refilled");
        let off = limits(0, 0, 0);
        for _ in 0..1000 {
            off.admit_broadcast(&a, t0).unwrap();
        }
    }

    #[test]
    fn deadlines_beyond_the_cap_are_refused() {
        let l = limits(0, 0, 0);
        assert!(l.check_deadline(None).is_ok());
        assert!(l.check_deadline(Some(Duration::from_secs(60))).is_ok());
        let error = l.check_deadline(Some(Duration::from_secs(3600))).unwrap_err();
        assert!(error.to_string().contains("--max-deadline"), "{error}");
    }
}
