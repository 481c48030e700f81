//! One task per webhook: follows the replay ring from the moment the
//! replica starts, POSTs each matching delivery (in sequence order; with
//! `--webhook-concurrency` N, up to N at once, started in order), retries
//! by the contract, and stops at Closing. What is left then is counted and
//! logged: as a native sidecar replicast gets SIGTERM only after the app
//! exited, so POSTs during its drain fail and are retried until the drain
//! ends.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::{StreamExt as _, stream::FuturesUnordered};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, info, warn};

use super::{
    WebhookConfig,
    contract::{Answer, Decision, parse_retry_after},
    event::{self, Context},
    signature::Secrets,
};
use crate::{
    error::error_chain,
    lifecycle::{Phase, PhaseRx},
    local::{AppFailure, AppOutcome, AppReceipt, Followed, LocalDelivery},
    telemetry::propagation::debug_message,
};

/// How often the backlog gauge is brought up to date at least.
const BACKLOG_REFRESH: Duration = Duration::from_millis(500);

/// Labels naming a webhook.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub webhook: String,
}

/// Labels of one POST's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookResultLabels {
    pub webhook: String,
    /// delivered (2xx), retried (an attempt that will be retried),
    /// dead_lettered (given up), abandoned (left at shutdown).
    pub result: &'static str,
}

/// The webhook metrics, shared by every webhook of a replica.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    pub deliveries: Family<WebhookResultLabels, Counter>,
    /// From the first attempt to the 2xx, retries included.
    pub latency: Family<WebhookLabels, Histogram>,
    /// Deliveries not yet POSTed (or in flight).
    pub backlog: Family<WebhookLabels, Gauge>,
    /// Deliveries that fell out of the ring before this webhook read them.
    pub lost: Family<WebhookLabels, Counter>,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self {
            deliveries: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.0005, 2.0, 16,
                ))
            }),
            backlog: Family::default(),
            lost: Family::default(),
        }
    }
}

impl WebhookMetrics {
    fn count(&self, webhook: &str, result: &'static str, n: u64) {
        self.deliveries
            .get_or_create(&WebhookResultLabels {
                webhook: webhook.to_owned(),
                result,
            })
            .inc_by(n);
    }
}

/// Why the webhooks could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookStartError {
    #[error("cannot read --webhook-secret-file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--webhook-secret-file {path}: {source}")]
    Secrets {
        path: std::path::PathBuf,
        #[source]
        source: super::signature::SecretsError,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Starts one task per webhook; each ends at Closing. When `local` waits
/// for the apps (`--webhook-ack`), webhook `i` answers for bit `i` of the
/// app receipts ([`crate::local::AppReceipt`]).
pub async fn spawn_webhooks(
    webhooks: Vec<WebhookConfig>,
    local: Arc<LocalDelivery>,
    metrics: WebhookMetrics,
    phase: PhaseRx,
) -> Result<Vec<JoinHandle<()>>, WebhookStartError> {
    let mut tasks = Vec::new();
    for (index, webhook) in webhooks.into_iter().enumerate() {
        let secrets = match &webhook.settings.secret_file {
            Some(path) => {
                let text =
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|source| WebhookStartError::Read {
                            path: path.clone(),
                            source,
                        })?;
                Some(
                    Secrets::parse(&text).map_err(|source| WebhookStartError::Secrets {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let client = reqwest::Client::builder()
            .timeout(webhook.settings.timeout)
            .connect_timeout(webhook.settings.timeout.min(Duration::from_secs(5)))
            // The app is next to the replica: never through a proxy.
            .no_proxy()
            .build()?;
        info!(
            webhook = %webhook.name,
            topics = ?webhook.topics,
            mode = ?webhook.settings.mode,
            concurrency = webhook.settings.concurrency,
            signed = secrets.is_some(),
            acknowledged = local.waits_for_apps(),
            "webhook: every delivery to this replica is POSTed to the app"
        );
        let span = tracing::info_span!("webhook", webhook = %webhook.name);
        let sink = Sink {
            client,
            secrets,
            incarnation: local.incarnation(),
            metrics: metrics.clone(),
            started: Arc::new(AtomicBool::new(false)),
            ack_bit: local
                .waits_for_apps()
                .then(|| u32::try_from(index).expect("at most 64 acked webhooks")),
            label: Arc::from(webhook.name.as_str()),
            webhook: Arc::new(webhook),
        };
        tasks.push(tokio::spawn(
            sink.run(local.clone(), phase.clone()).instrument(span),
        ));
    }
    Ok(tasks)
}

/// One webhook's state, shared by its POSTs in flight.
#[derive(Clone)]
struct Sink {
    client: reqwest::Client,
    secrets: Option<Secrets>,
    incarnation: u64,
    metrics: WebhookMetrics,
    /// The app has answered 2xx once (a 404 before means "still starting").
    started: Arc<AtomicBool>,
    /// `--webhook-ack`: this webhook's bit in the app receipts.
    ack_bit: Option<u32>,
    /// The webhook's name, as app receipts carry it.
    label: Arc<str>,
    webhook: Arc<WebhookConfig>,
}

impl Sink {
    async fn run(self, local: Arc<LocalDelivery>, phase: PhaseRx) {
        let name = self.webhook.name.clone();
        let labels = WebhookLabels {
            webhook: name.clone(),
        };
        let backlog = self.metrics.backlog.get_or_create(&labels).clone();
        let mut follower = local.follow(self.webhook.filter(), self.ack_bit);
        let mut in_flight = FuturesUnordered::new();
        let concurrency = self.webhook.settings.concurrency.max(1);
        let stopped = phase.reached(Phase::Closing);
        tokio::pin!(stopped);
        // The backlog grows while this task waits on the app: refreshed on
        // a tick too, not only when a POST ends.
        let mut refresh = tokio::time::interval(BACKLOG_REFRESH);
        loop {
            tokio::select! {
                biased;
                () = &mut stopped => break,
                Some(()) = in_flight.next() => {}
                _ = refresh.tick() => {}
                followed = follower.next(), if in_flight.len() < concurrency => match followed {
                    Ok(followed) => {
                        if followed.lost_before > 0 {
                            self.metrics.lost.get_or_create(&labels).inc_by(followed.lost_before);
                            warn!(
                                lost = followed.lost_before,
                                next = followed.delivery.message.id(),
                                "webhook fell behind the replay ring: deliveries lost before the next POST, \
                                 which says how many in ce-replicastlost (a slow app: raise \
                                 --replay-capacity/--replay-max-bytes, or --webhook-concurrency)"
                            );
                        }
                        in_flight.push(self.clone().deliver(followed));
                    }
                    // Closed: everything delivered before was handed out.
                    Err(_) => break,
                },
            }
            backlog.set(i64::try_from(follower.backlog()).unwrap_or(i64::MAX) + in_flight.len() as i64);
        }
        // Exact at the end: what matched and was not handed to the app. The
        // POSTs in flight fail their app receipts as they are dropped.
        let left = follower.abandon_rest(&self.label) + in_flight.len() as u64;
        drop(in_flight);
        backlog.set(0);
        if left > 0 {
            self.metrics.count(&name, "abandoned", left);
            warn!(
                left,
                "webhook: deliveries not POSTed (or not answered) when the replica closed; \
                 the app did not get them from this replica"
            );
        }
    }

    /// POSTs one delivery until the contract says done or dead letter,
    /// and reports that on its app receipt (if it has one, and also when
    /// this future is dropped unfinished at shutdown).
    async fn deliver(self, followed: Followed) {
        let mut answer_for = AppAnswer {
            receipt: followed.delivery.app_receipt.clone().zip(self.ack_bit),
            webhook: self.label.clone(),
        };
        let message = followed.delivery.message.to_message();
        let request = event::build(
            self.webhook.settings.mode,
            &message,
            Context {
                sequence: followed.delivery.sequence,
                incarnation: self.incarnation,
                lost_before: followed.lost_before,
            },
        );
        let name = &self.webhook.name;
        let first = Instant::now();
        for attempt in 1u32.. {
            let mut post = self
                .client
                .post(&self.webhook.url)
                .headers(request.headers.clone())
                .body(request.body.clone());
            // The app's own OpenTelemetry instrumentation continues the
            // Broadcast's trace from here.
            if let Some(context) = &followed.delivery.trace_context {
                for (key, value) in context.iter() {
                    post = post.header(key.as_str(), value.as_str());
                }
            }
            if let Some(secrets) = &self.secrets {
                let timestamp = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                post = post
                    .header("webhook-id", &message.id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header(
                        "webhook-signature",
                        secrets.sign(&message.id, timestamp, &request.body),
                    );
            }
            let answer = match post.send().await {
                Ok(response) => Answer::Status {
                    code: response.status().as_u16(),
                    retry_after: response
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now())),
                },
                Err(error) if error.is_timeout() => Answer::Timeout,
                Err(error) if error.is_connect() => Answer::Refused,
                Err(error) => Answer::Failed(error_chain(&error)),
            };
            let started = self.started.load(Ordering::Relaxed);
            let decision = self.webhook.settings.retry.decide(
                &answer,
                attempt,
                first.elapsed(),
                started,
                rand::random(),
            );
            debug_message!(
                followed.delivery.trace_context.as_deref(),
                message.id = %message.id,
                sequence = followed.delivery.sequence,
                attempt,
                %answer,
                ?decision,
                "POSTed to the app"
            );
            match decision {
                Decision::Done => {
                    answer_for.answer(Ok(()));
                    self.started.store(true, Ordering::Relaxed);
                    self.metrics.count(name, "delivered", 1);
                    self.metrics
                        .latency
                        .get_or_create(&WebhookLabels {
                            webhook: name.clone(),
                        })
                        .observe(first.elapsed().as_secs_f64());
                    return;
                }
                Decision::RetryIn(wait) => {
                    answer_for.attempt_failed(|| format!("webhook {name}: {answer} on attempt {attempt}"));
                    self.metrics.count(name, "retried", 1);
                    tokio::time::sleep(wait).await;
                }
                Decision::DeadLetter(reason) => {
                    answer_for.answer(Err(AppFailure::Refused {
                        webhook: self.label.clone(),
                        reason: reason.clone(),
                    }));
                    self.metrics.count(name, "dead_lettered", 1);
                    warn!(
                        id = %message.id,
                        topic = %message.topic,
                        sequence = followed.delivery.sequence,
                        %reason,
                        "webhook: message dead-lettered (not POSTed again)"
                    );
                    return;
                }
            }
        }
    }
}

/// A POST's duty to its delivery's app receipt: answered once, and as
/// abandoned if the POST is dropped before the app answered (the replica
/// closed), so a waiting receipt never says OK for what the app did not
/// process.
struct AppAnswer {
    receipt: Option<(Arc<AppReceipt>, u32)>,
    webhook: Arc<str>,
}

impl AppAnswer {
    fn answer(&mut self, outcome: AppOutcome) {
        if let Some((receipt, bit)) = self.receipt.take() {
            receipt.answered(bit, outcome);
        }
    }

    fn attempt_failed(&self, what: impl FnOnce() -> String) {
        if let Some((receipt, _)) = &self.receipt {
            receipt.attempt_failed(what());
        }
    }
}

impl Drop for AppAnswer {
    fn drop(&mut self) {
        let webhook = self.webhook.clone();
        self.answer(Err(AppFailure::Abandoned { webhook }));
    }
}
