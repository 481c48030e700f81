//! Head sampling: whether a call is traced, decided before any span is
//! built.
//!
//! The OpenTelemetry SDK samples when a span starts, which in
//! tracing-opentelemetry means after the `tracing` span was built, its
//! fields recorded and its parent context looked up: an unsampled Broadcast
//! paid for a span nobody exported (at 1 % sampling, 0.72x the throughput of
//! tracing off). So replicast applies the configured sampler itself, to the
//! caller's `traceparent` (when there is one) and a random draw, before the
//! server span exists; an unsampled call builds no span and sends no
//! context. The SDK then only follows parents (`ParentBased(AlwaysOn)`, or
//! `AlwaysOn` for the samplers that ignore parents), so the two decisions
//! never disagree.

use opentelemetry_sdk::trace::Sampler;

/// The configured sampler, as replicast applies it at the edge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HeadSampler {
    AlwaysOn,
    AlwaysOff,
    /// Traces this fraction of calls. For a call with a parent, the
    /// decision depends on the trace id (as `TraceIdRatioBased`), so every
    /// service deciding on the same trace agrees.
    Ratio(f64),
    /// Follows a sampled or unsampled parent; applies `root` to calls that
    /// have none.
    ParentBased(Root),
}

/// What a parent-based sampler does with calls that have no parent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

/// The caller's span context, as far as sampling cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The low 64 bits of the trace id (what `TraceIdRatioBased` looks at).
    pub trace_id_low: u64,
    pub sampled: bool,
}

impl HeadSampler {
    /// From `--traces-sampler` and its argument; `None` for an unknown name.
    pub fn from_name(name: &str, arg: Option<f64>) -> Option<Self> {
        let ratio = arg.unwrap_or(1.0).clamp(0.0, 1.0);
        Some(match name {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::Ratio(ratio),
            "parentbased_always_on" => Self::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Self::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Self::ParentBased(Root::Ratio(ratio)),
            _ => return None,
        })
    }

    /// Whether to trace a call with `parent`; `draw` in [0, 1) decides
    /// ratio sampling of calls without one.
    pub fn decide(&self, parent: Option<Parent>, draw: f64) -> bool {
        match (self, parent) {
            (Self::AlwaysOn, _) => true,
            (Self::AlwaysOff, _) => false,
            (Self::Ratio(ratio), Some(parent)) => trace_id_under(parent.trace_id_low, *ratio),
            (Self::Ratio(ratio), None) => draw < *ratio,
            (Self::ParentBased(_), Some(parent)) => parent.sampled,
            (Self::ParentBased(Root::AlwaysOn), None) => true,
            (Self::ParentBased(Root::AlwaysOff), None) => false,
            (Self::ParentBased(Root::Ratio(ratio)), None) => draw < *ratio,
        }
    }

    /// The sampler the SDK gets: it only has to follow what was decided.
    pub fn sdk_sampler(&self) -> Sampler {
        match self {
            Self::ParentBased(_) => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            _ => Sampler::AlwaysOn,
        }
    }
}

/// `TraceIdRatioBased`'s rule: the low 63 bits of the trace id under the
/// ratio's share of them.
fn trace_id_under(trace_id_low: u64, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let threshold = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    (trace_id_low >> 1) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLED: Parent = Parent {
        trace_id_low: u64::MAX,
        sampled: true,
    };
    const UNSAMPLED: Parent = Parent {
        trace_id_low: 0,
        sampled: false,
    };

    #[test]
    fn parent_based_follows_the_parent_and_samples_roots_by_draw() {
        let s = HeadSampler::from_name("parentbased_traceidratio", Some(0.01)).unwrap();
        assert!(s.decide(Some(SAMPLED), 0.99), "a sampled caller is followed");
        assert!(!s.decide(Some(UNSAMPLED), 0.0), "so is an unsampled one");
        assert!(s.decide(None, 0.005), "a root under the ratio");
        assert!(!s.decide(None, 0.5), "a root over it");
        let on = HeadSampler::from_name("parentbased_always_on", None).unwrap();
        assert!(on.decide(None, 0.99));
        assert!(!on.decide(Some(UNSAMPLED), 0.0));
    }

    #[test]
    fn ratio_decides_on_the_trace_id_when_there_is_one() {
        let s = HeadSampler::from_name("traceidratio", Some(0.5)).unwrap();
        let low = Parent {
            trace_id_low: 1 << 10,
            sampled: false,
        };
        let high = Parent {
            trace_id_low: u64::MAX,
            sampled: true,
        };
        assert!(
            s.decide(Some(low), 0.99),
            "ignores the parent's flag, reads its id"
        );
        assert!(!s.decide(Some(high), 0.0));
        assert!(HeadSampler::Ratio(1.0).decide(Some(high), 0.99));
        assert!(!HeadSampler::Ratio(0.0).decide(Some(low), 0.0));
    }

    #[test]
    fn fixed_samplers_and_names() {
        assert!(
            HeadSampler::from_name("always_on", None)
                .unwrap()
                .decide(None, 0.99)
        );
        assert!(
            !HeadSampler::from_name("always_off", None)
                .unwrap()
                .decide(Some(SAMPLED), 0.0)
        );
        assert_eq!(HeadSampler::from_name("sometimes", None), None);
        assert_eq!(
            HeadSampler::from_name("traceidratio", Some(7.0)),
            Some(HeadSampler::Ratio(1.0)),
            "clamped"
        );
    }
}
