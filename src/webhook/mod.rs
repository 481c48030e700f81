//! Webhook sinks: every message delivered to this replica is POSTed to the
//! app (`--webhook URL`), as a CloudEvent ([`event`]), optionally signed
//! ([`signature`]), retried or dead-lettered by the contract of
//! [`contract`]. Each webhook is one task ([`sink`]) that reads the replay
//! ring with its own cursor, like a subscriber: a slow or dead app never
//! slows Deliver, the fan-out, Subscribe streams or another webhook, and its
//! backlog costs nothing but that cursor.

pub mod contract;
pub mod event;
pub mod signature;
mod sink;

use std::{path::PathBuf, sync::Arc, time::Duration};

pub use self::sink::{WebhookMetrics, WebhookStartError, spawn_webhooks};
use crate::local::TopicFilter;

/// One `--webhook`, validated.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where to POST (the URL given, without its fragment).
    pub url: String,
    /// How metrics and logs name it: scheme, host, port and path (no query,
    /// which may hold credentials).
    pub name: String,
    /// The topics it gets (from `#topics=`), as Subscribe filters.
    pub topics: Vec<String>,
    pub settings: WebhookSettings,
}

impl WebhookConfig {
    pub fn filter(&self) -> TopicFilter {
        TopicFilter::new(&self.topics)
    }

    /// The webhooks whose answers local deliveries wait for: all of them
    /// with `--webhook-ack`, in order (webhook `i` is bit `i`).
    pub fn acked(webhooks: &[WebhookConfig]) -> Vec<crate::local::AckedWebhook> {
        webhooks
            .iter()
            .filter(|hook| hook.settings.ack)
            .map(|hook| crate::local::AckedWebhook {
                name: Arc::from(hook.name.as_str()),
                filter: hook.filter(),
            })
            .collect()
    }
}

/// What every webhook of a replica shares (the `--webhook-*` flags).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub mode: event::Mode,
    /// POSTs in flight at once per webhook (1: strictly one after another).
    pub concurrency: usize,
    /// Bound on one POST (connect, send, answer).
    pub timeout: Duration,
    pub retry: contract::RetryPolicy,
    /// `--webhook-secret-file`: sign with Standard Webhooks headers.
    pub secret_file: Option<PathBuf>,
    /// `--webhook-ack`: receipts wait for the app's 2xx.
    pub ack: bool,
}

/// A `--webhook` value that cannot work; the message says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--webhook {value}: {reason}")]
pub struct WebhookError {
    pub value: String,
    pub reason: String,
}

impl WebhookConfig {
    /// `http://host:port/path[?query][#topics=a,b*]`. The fragment is never
    /// sent over HTTP, so replicast's own options can live there.
    pub fn parse(value: &str, settings: WebhookSettings) -> Result<Self, WebhookError> {
        let error = |reason: String| WebhookError {
            value: value.to_owned(),
            reason,
        };
        let mut url = reqwest::Url::parse(value).map_err(|e| error(format!("not a URL ({e})")))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(error(
                    "https is not supported: a webhook is for the app next to the replica (http://127.0.0.1:PORT/...)"
                        .into(),
                ));
            }
            other => return Err(error(format!("scheme {other}: only http is supported"))),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(error("no host".into()));
        }
        let topics = match url.fragment() {
            None | Some("") => Vec::new(),
            Some(fragment) => {
                let list = fragment.strip_prefix("topics=").ok_or_else(|| {
                    error(format!(
                        "unknown option #{fragment}: the fragment takes topics=a,b*"
                    ))
                })?;
                let decoded = percent_encoding::percent_decode_str(list).decode_utf8_lossy();
                let topics: Vec<String> = decoded.split(',').map(str::to_owned).collect();
                crate::validate::topic_filters(&topics).map_err(|e| error(e.to_string()))?;
                topics
            }
        };
        url.set_fragment(None);
        let name = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port().map(|p| format!(":{p}")).unwrap_or_default()
        ) + url.path();
        Ok(Self {
            url: url.to_string(),
            name,
            topics,
            settings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WebhookSettings {
        WebhookSettings {
            mode: event::Mode::Binary,
            concurrency: 1,
            timeout: Duration::from_secs(1),
            retry: contract::RetryPolicy {
                max_attempts: 3,
                max_age: Duration::from_secs(10),
                retry_after_cap: Duration::from_secs(1),
                base_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_secs(1),
            },
            secret_file: None,
            ack: false,
        }
    }

    #[test]
    fn the_fragment_holds_the_topics_and_is_not_sent() {
        let hook = WebhookConfig::parse(
            "http://127.0.0.1:8080/events?key=s3cret#topics=cache.*,user.logout",
            settings(),
        )
        .unwrap();
        assert_eq!(hook.url, "http://127.0.0.1:8080/events?key=s3cret");
        assert_eq!(hook.name, "http://127.0.0.1:8080/events");
        assert_eq!(hook.topics, vec!["cache.*", "user.logout"]);
        let all = WebhookConfig::parse("http://app/", settings()).unwrap();
        assert!(all.topics.is_empty() && all.filter().matches("anything"));
    }

    #[test]
    fn unusable_webhooks_say_why() {
        for (value, why) in [
            ("127.0.0.1:8080", "not a URL"),
            ("https://app/", "https is not supported"),
            ("ftp://app/", "only http"),
            ("http://app/#topcs=a", "unknown option"),
            ("http://app/#topics=a,,b", "topic"),
        ] {
            let error = WebhookConfig::parse(value, settings()).unwrap_err();
            assert!(error.to_string().contains(why), "{value}: {error}");
        }
    }
}
