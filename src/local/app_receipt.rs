//! The app's receipt for one delivery, with `--webhook-ack`: the replica's
//! own receipt (the Deliver answer, the DeliverStream ack, the origin's
//! local receipt) waits for it, so an OK receipt means "the app answered
//! 2xx", not only "it reached the pod".
//!
//! One [`AppReceipt`] per delivery that some webhook must acknowledge,
//! created under the local-delivery lock when the message is appended to
//! the ring, held by the ring entry, the dedup window (a retry of the same
//! id gets the same answer) and every call waiting on it. Each webhook is a
//! bit: the receipt settles OK when every webhook it waits on answered 2xx,
//! and fails as soon as one of them gives up on it (dead letter), loses it
//! (it fell out of the ring before that webhook read it) or abandons it
//! (the replica closed first). Nothing here is asynchronous but
//! [`AppReceipt::wait`]; the state changes are plain calls under a short
//! `std::sync::Mutex` and unit-tested below.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

/// Most webhooks a replica acknowledges through (one bit each).
pub const MAX_ACKED_WEBHOOKS: usize = 64;

/// How a delivery's app receipt ended: `Ok` once every webhook answered 2xx.
pub type AppOutcome = Result<(), AppFailure>;

/// Why the app did not (yet) process a delivery. Each names the webhook and
/// what the app answered, for the Broadcast's receipts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppFailure {
    /// The contract gave up on it: a 4xx, or out of attempts or age.
    #[error("webhook {webhook}: {reason}")]
    Refused { webhook: Arc<str>, reason: String },
    /// It fell out of the replay ring before this webhook read it.
    #[error(
        "the app never got it: webhook {webhook} fell behind the replay ring (--replay-capacity, \
         --replay-max-bytes) before POSTing it"
    )]
    Lost { webhook: Arc<str> },
    /// The replica closed with this webhook's POST not answered.
    #[error("this replica closed before the app answered: webhook {webhook} never got a 2xx for it")]
    Abandoned { webhook: Arc<str> },
    /// The caller's time ran out first; the webhook goes on trying.
    #[error("the app has not answered within {}{}", humantime::format_duration(*waited), LastAttempt(last))]
    NotYet {
        waited: Duration,
        /// The last attempt that failed, if any: "webhook X answered 503".
        last: Option<String>,
    },
}

struct LastAttempt<'a>(&'a Option<String>);

impl fmt::Display for LastAttempt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(last) => write!(f, " (last attempt: {last}; still retrying)"),
            None => f.write_str(" (the POST is queued or in flight)"),
        }
    }
}

/// One delivery's app receipt. See the module documentation.
#[derive(Debug)]
pub struct AppReceipt {
    state: Mutex<State>,
    outcome_tx: watch::Sender<Option<AppOutcome>>,
}

#[derive(Debug)]
struct State {
    /// The webhooks (bits) that have not answered 2xx yet.
    waiting_on: u64,
    /// Of those, the ones that read it from the ring: it can no longer be
    /// lost to them.
    taken: u64,
    /// The last failed attempt, for a caller whose time runs out.
    last_attempt: Option<String>,
}

impl AppReceipt {
    /// A receipt that waits on the webhooks whose bits are set.
    pub fn new(waiting_on: u64) -> Arc<Self> {
        debug_assert!(waiting_on != 0, "a receipt that waits on nobody");
        Arc::new(Self {
            state: Mutex::new(State {
                waiting_on,
                taken: 0,
                last_attempt: None,
            }),
            outcome_tx: watch::channel(None).0,
        })
    }

    /// Webhook `bit` read the delivery from the ring.
    pub fn taken(&self, bit: u32) {
        self.lock().taken |= 1 << bit;
    }

    /// An attempt by a webhook failed and will be retried.
    pub fn attempt_failed(&self, what: String) {
        self.lock().last_attempt = Some(what);
    }

    /// Webhook `bit` is done with it: 2xx (`Ok`) or given up (`Err`).
    pub fn answered(&self, bit: u32, result: AppOutcome) {
        let mut state = self.lock();
        state.waiting_on &= !(1 << bit);
        match result {
            Err(failure) => self.settle(Err(failure)),
            Ok(()) if state.waiting_on == 0 => self.settle(Ok(())),
            Ok(()) => {}
        }
    }

    /// The ring dropped the delivery: lost to every webhook still waiting
    /// that had not read it. `name` names a webhook by its bit.
    pub fn evicted(&self, name: impl Fn(u32) -> Arc<str>) {
        let state = self.lock();
        let lost = state.waiting_on & !state.taken;
        if lost != 0 {
            self.settle(Err(AppFailure::Lost {
                webhook: name(lost.trailing_zeros()),
            }));
        }
    }

    /// The outcome, once settled.
    pub fn outcome(&self) -> Option<AppOutcome> {
        self.outcome_tx.borrow().clone()
    }

    /// Waits for the outcome until `until`; then fails with
    /// [`AppFailure::NotYet`] naming the last failed attempt.
    pub async fn wait(&self, until: Instant) -> AppOutcome {
        let started = Instant::now();
        let mut outcome_rx = self.outcome_tx.subscribe();
        let settled = tokio::time::timeout_at(until, outcome_rx.wait_for(Option::is_some)).await;
        match settled {
            // The sender lives in `self`: the wait cannot see it closed.
            Ok(Ok(outcome)) => outcome.clone().unwrap_or(Ok(())),
            Ok(Err(_)) | Err(_) => Err(AppFailure::NotYet {
                waited: started.elapsed(),
                last: self.lock().last_attempt.clone(),
            }),
        }
    }

    /// The first settlement wins: a later answer of another webhook does
    /// not turn a failure into a success.
    fn settle(&self, outcome: AppOutcome) {
        self.outcome_tx.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(outcome);
            true
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(bit: u32) -> Arc<str> {
        Arc::from(format!("hook{bit}"))
    }

    #[test]
    fn settles_ok_when_every_webhook_answered() {
        let receipt = AppReceipt::new(0b101);
        receipt.answered(0, Ok(()));
        assert_eq!(receipt.outcome(), None, "webhook 2 has not answered");
        receipt.answered(2, Ok(()));
        assert_eq!(receipt.outcome(), Some(Ok(())));
    }

    #[test]
    fn the_first_failure_wins() {
        let receipt = AppReceipt::new(0b11);
        let refused = AppFailure::Refused {
            webhook: name(1),
            reason: "answered 400".into(),
        };
        receipt.answered(1, Err(refused.clone()));
        receipt.answered(0, Ok(()));
        assert_eq!(receipt.outcome(), Some(Err(refused)));
    }

    #[test]
    fn eviction_loses_it_only_for_webhooks_that_had_not_read_it() {
        let receipt = AppReceipt::new(0b11);
        receipt.taken(0);
        receipt.taken(1);
        receipt.evicted(name);
        assert_eq!(receipt.outcome(), None, "both webhooks hold it");

        let receipt = AppReceipt::new(0b110);
        receipt.taken(1);
        receipt.evicted(name);
        assert_eq!(
            receipt.outcome(),
            Some(Err(AppFailure::Lost { webhook: name(2) }))
        );

        let receipt = AppReceipt::new(0b1);
        receipt.answered(0, Ok(()));
        receipt.evicted(name);
        assert_eq!(receipt.outcome(), Some(Ok(())), "answered before the eviction");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_names_the_last_attempt() {
        let receipt = AppReceipt::new(0b1);
        let until = Instant::now() + Duration::from_millis(900);
        let early = receipt.wait(until).await.unwrap_err();
        assert_eq!(
            early.to_string(),
            "the app has not answered within 900ms (the POST is queued or in flight)"
        );
        receipt.attempt_failed("webhook http://app/ answered 503 Service Unavailable on attempt 2".into());
        let later = receipt
            .wait(Instant::now() + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            later.to_string().ends_with(
                "(last attempt: webhook http://app/ answered 503 Service Unavailable on attempt 2; still retrying)"
            ),
            "{later}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_when_it_settles() {
        let receipt = AppReceipt::new(0b1);
        let waiter = {
            let receipt = receipt.clone();
            tokio::spawn(async move { receipt.wait(Instant::now() + Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        receipt.answered(0, Ok(()));
        assert_eq!(waiter.await.unwrap(), Ok(()));
        // A late waiter (a retry of the same id) gets the same answer at once.
        assert_eq!(receipt.wait(Instant::now()).await, Ok(()));
    }
}
