//! A replica's lifecycle: one [`Phase`] on one `watch` that every part
//! reads (health, admission of Broadcast and Publish, Deliver, Subscribe,
//! links, membership), and one shutdown deadline shared out among the steps
//! of the shutdown ([`ShutdownPlan`]), so the worst case is one number.

use std::{fmt, time::Duration};

use tokio::{sync::watch, time::Instant};

/// Where a replica is in its life. Phases only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Accepting everything.
    Serving,
    /// Shutting down, first part: the replica has announced its leave,
    /// health says NOT_SERVING, Broadcast and Publish are refused; it still
    /// accepts deliveries from peers that have not heard (their DNS may
    /// still list it) and still serves Subscribe.
    Draining,
    /// Shutting down, second part: local delivery is closed (later
    /// deliveries are refused, never acknowledged), DeliverStreams and
    /// Subscribe streams end after what was delivered, the server stops.
    Closing,
    /// Everything has stopped.
    Stopped,
}

/// The writing end, owned by the server.
#[derive(Debug)]
pub struct PhaseTx(watch::Sender<Phase>);

/// A reading end; cheap to clone.
#[derive(Debug, Clone)]
pub struct PhaseRx(watch::Receiver<Phase>);

/// A lifecycle starting in [`Phase::Serving`].
pub fn lifecycle() -> (PhaseTx, PhaseRx) {
    let (tx, rx) = watch::channel(Phase::Serving);
    (PhaseTx(tx), PhaseRx(rx))
}

impl PhaseTx {
    /// Moves to `phase` if that is forward; returns whether it moved.
    pub fn advance(&self, phase: Phase) -> bool {
        self.0.send_if_modified(|current| {
            let forward = phase > *current;
            if forward {
                *current = phase;
            }
            forward
        })
    }

    /// Another reading end.
    pub fn subscribe(&self) -> PhaseRx {
        PhaseRx(self.0.subscribe())
    }
}

impl PhaseRx {
    /// The phase now.
    pub fn current(&self) -> Phase {
        *self.0.borrow()
    }

    /// True once the replica is at `phase` or later.
    pub fn has_reached(&self, phase: Phase) -> bool {
        self.current() >= phase
    }

    /// Resolves once the replica is at `phase` or later (also when the
    /// server is gone: then everything has stopped).
    pub fn reached(&self, phase: Phase) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|current| *current >= phase).await;
        }
    }
}

/// How long each step of a shutdown may take at most, within one deadline.
/// Printed at start-up, so an operator can set the pod's
/// `terminationGracePeriodSeconds` above [`ShutdownPlan::total`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownPlan {
    /// Announcing the leave to every peer (they answer once they stopped
    /// targeting this replica).
    pub leave: Duration,
    /// The whole draining phase, the leave included.
    pub drain: Duration,
    /// Closing: streams get what was delivered, connections end.
    pub close: Duration,
    /// Background hops still in flight and links stopping.
    pub links: Duration,
}

/// Longest wait for the leave announcements.
const LEAVE_MAX: Duration = Duration::from_secs(2);
/// Longest close step: subscribers get what was delivered, if they read.
const CLOSE_MAX: Duration = Duration::from_secs(5);
/// Longest wait for background hops and links.
const LINKS_MAX: Duration = Duration::from_secs(3);

impl ShutdownPlan {
    /// Shares `total` out: the drain gets `drain` (at least the leave), the
    /// close and links steps get what they need up to their maximum, and
    /// the drain gives up time when the total is too short for all of them.
    pub fn new(total: Duration, drain: Duration) -> Self {
        let leave = LEAVE_MAX.min(total / 4);
        let after_drain = total.saturating_sub(drain.max(leave));
        let close = CLOSE_MAX.min(total / 4).min(after_drain.max(total / 8));
        let links = LINKS_MAX.min(total / 8);
        let drain = drain.max(leave).min(total.saturating_sub(close + links));
        Self {
            leave: leave.min(drain),
            drain,
            close,
            links,
        }
    }

    /// The worst case of a shutdown.
    pub fn total(&self) -> Duration {
        self.drain + self.close + self.links
    }
}

impl fmt::Display for ShutdownPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at most {:?}: drain {:?} (announcing the leave at most {:?}), close {:?}, background hops {:?}",
            self.total(),
            self.drain,
            self.leave,
            self.close,
            self.links
        )
    }
}

/// The deadline of one shutdown, fixed when it starts; each step waits
/// until its own end, which never passes the deadline.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownClock {
    started: Instant,
    plan: ShutdownPlan,
}

impl ShutdownClock {
    pub fn start(plan: ShutdownPlan) -> Self {
        Self {
            started: Instant::now(),
            plan,
        }
    }

    /// When the leave announcements are given up.
    pub fn leave_ends(&self) -> Instant {
        self.started + self.plan.leave
    }

    /// When the drain ends and closing starts.
    pub fn drain_ends(&self) -> Instant {
        self.started + self.plan.drain
    }

    /// When the close step ends (connections still open are dropped).
    pub fn close_ends(&self) -> Instant {
        self.drain_ends() + self.plan.close
    }

    /// The deadline of the whole shutdown.
    pub fn deadline(&self) -> Instant {
        self.started + self.plan.total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn phases_only_move_forward() {
        let (tx, rx) = lifecycle();
        assert!(tx.advance(Phase::Draining));
        assert!(!tx.advance(Phase::Serving), "no way back");
        assert!(!tx.advance(Phase::Draining), "no change, no wakeup");
        assert!(rx.has_reached(Phase::Draining) && !rx.has_reached(Phase::Closing));
        assert!(tx.advance(Phase::Stopped), "phases may be skipped");
        assert_eq!(rx.current(), Phase::Stopped);
    }

    #[tokio::test]
    async fn reached_resolves_at_or_after_the_phase_and_when_the_server_is_gone() {
        let (tx, rx) = lifecycle();
        let closing = tokio::spawn(rx.reached(Phase::Closing));
        tx.advance(Phase::Draining);
        tokio::task::yield_now().await;
        assert!(!closing.is_finished());
        tx.advance(Phase::Stopped);
        closing.await.unwrap();
        let (tx, rx) = lifecycle();
        drop(tx);
        rx.reached(Phase::Closing).await;
    }

    #[test]
    fn the_default_plan_fits_a_30s_grace_period() {
        let plan = ShutdownPlan::new(secs(25), secs(10));
        assert_eq!(plan.drain, secs(10));
        assert_eq!(plan.leave, secs(2));
        assert_eq!(plan.close, secs(5));
        assert_eq!(plan.links, secs(3));
        assert_eq!(plan.total(), secs(18));
        assert!(plan.total() <= secs(25));
    }

    #[test]
    fn a_short_total_shortens_the_drain_never_the_bound() {
        for (total, drain) in [(10, 10), (5, 30), (1, 1), (0, 10), (60, 0)] {
            let plan = ShutdownPlan::new(secs(total), secs(drain));
            assert!(plan.total() <= secs(total), "{plan} within {total}s");
            assert!(plan.leave <= plan.drain, "{plan}: the leave is part of the drain");
        }
        let plan = ShutdownPlan::new(secs(10), secs(10));
        assert!(plan.drain >= secs(6), "{plan}");
        assert!(plan.close >= Duration::from_millis(1250), "{plan}");
    }

    #[test]
    fn the_clock_orders_the_steps() {
        let clock = ShutdownClock::start(ShutdownPlan::new(secs(25), secs(10)));
        assert!(clock.leave_ends() <= clock.drain_ends());
        assert!(clock.drain_ends() < clock.close_ends());
        assert!(clock.close_ends() < clock.deadline());
    }
}
