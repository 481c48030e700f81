//! Telemetry: logs, OpenTelemetry traces and the plumbing between them.
//!
//! Everything process-wide lives here: the `tracing` subscriber (log output
//! plus, when an OTLP endpoint is configured, the OpenTelemetry layer), the
//! W3C propagator, the batch exporter and its shutdown. The rest of the code
//! only creates `tracing` spans with OpenTelemetry's semantic-convention
//! field names and asks [`tracing_enabled`] whether to bother: with no
//! endpoint configured no trace span is created at all, so tracing off costs
//! one relaxed atomic load per message.

mod export;
mod logs;
pub mod propagation;
pub mod sampling;
mod server_layer;
pub mod spans;

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::{KeyValue, global, trace::TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider},
};
use tracing_subscriber::{EnvFilter, Layer, filter::Targets, prelude::*};

use self::sampling::HeadSampler;
pub use self::{
    logs::LogFormat,
    server_layer::{GrpcTraceLayer, http_server_span},
};

/// Whether trace spans are being exported; checked before creating any.
static TRACING: AtomicBool = AtomicBool::new(false);
/// Spans dropped because the export queue was full (collector down or slow).
static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// The sampler applied before a call's server span is built.
static HEAD_SAMPLER: OnceLock<HeadSampler> = OnceLock::new();

/// The process's head sampler (never samples while tracing is off).
pub fn head_sampler() -> HeadSampler {
    HEAD_SAMPLER.get().copied().unwrap_or(HeadSampler::AlwaysOff)
}

/// Whether OpenTelemetry tracing is on in this process.
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Spans dropped so far because the export queue was full.
pub fn spans_dropped() -> u64 {
    SPANS_DROPPED.load(Ordering::Relaxed)
}

/// Spans waiting for export at most; beyond this they are dropped (and
/// counted), never waited for.
const EXPORT_QUEUE: usize = 4096;
/// How often a batch is sent.
const EXPORT_INTERVAL: Duration = Duration::from_millis(500);
/// How long one export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Logging and tracing flags, for `serve` and `dev-cluster`. The
/// OpenTelemetry ones read the standard `OTEL_*` environment variables.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// OTLP collector endpoint, e.g. http://otel-collector:4317 (grpc) or
    /// http://otel-collector:4318 (http/protobuf). Unset: no traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// OTLP transport.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum, default_value = "grpc")]
    pub otlp_protocol: OtlpProtocol,

    /// service.name of the exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "replicast")]
    pub service_name: String,

    /// Extra resource attributes, key=value,key=value.
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_delimiter = ',', value_parser = parse_key_value)]
    pub resource_attributes: Vec<(String, String)>,

    /// Sampler: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off, parentbased_traceidratio.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", default_value = "parentbased_always_on")]
    pub traces_sampler: String,

    /// Sampler argument (the ratio for the *traceidratio samplers).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub traces_sampler_arg: Option<f64>,

    /// Kubernetes pod name (downward API), exported as k8s.pod.name.
    #[arg(long, env = "POD_NAME", hide = true)]
    pub pod_name: Option<String>,

    /// Kubernetes namespace (downward API), exported as k8s.namespace.name.
    #[arg(long, env = "POD_NAMESPACE", hide = true)]
    pub pod_namespace: Option<String>,

    /// Kubernetes node name (downward API), exported as k8s.node.name.
    #[arg(long, env = "NODE_NAME", hide = true)]
    pub node_name: Option<String>,
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL` values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    #[default]
    #[value(name = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--traces-sampler {0:?} is not a known sampler")]
    Sampler(String),
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Owns the tracer provider; [`Telemetry::shutdown`] flushes what is queued.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (bounded by its export timeout). The
    /// SDK's shutdown blocks, so it runs on a blocking thread.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = flushed {
                tracing::debug!(error = %e, "trace exporter shutdown");
            }
        }
    }
}

/// Installs logging only (client commands).
pub fn init_logging(format: LogFormat) {
    let _ = tracing_subscriber::registry()
        .with(logs::layer(format))
        .with(log_filter())
        .try_init();
}

/// Installs logging and, when an endpoint is configured, OpenTelemetry
/// tracing with `instance` (this replica's address) as service.instance.id.
/// Must run inside the tokio runtime (the gRPC exporter's channel needs it).
pub fn init(format: LogFormat, args: &TelemetryArgs, instance: &str) -> Result<Telemetry, TelemetryError> {
    let Some(endpoint) = args.otlp_endpoint.clone().filter(|e| !e.is_empty()) else {
        init_logging(format);
        return Ok(Telemetry { provider: None });
    };
    let head = HeadSampler::from_name(&args.traces_sampler, args.traces_sampler_arg)
        .ok_or_else(|| TelemetryError::Sampler(args.traces_sampler.clone()))?;
    let exporter = match args.otlp_protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
    }
    .map_err(|source| TelemetryError::Exporter {
        endpoint: endpoint.clone(),
        source,
    })?;
    let gate = export::Gate::new(EXPORT_QUEUE);
    let processor = BatchSpanProcessor::builder(export::CountingExporter::new(exporter, gate.clone()))
        .with_batch_config(
            BatchConfigBuilder::default()
                // Our gate (below) admits at most EXPORT_QUEUE spans; the
                // processor's own queue is larger so that it never drops
                // uncounted.
                .with_max_queue_size(EXPORT_QUEUE * 2)
                .with_scheduled_delay(EXPORT_INTERVAL)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(export::DropCountingProcessor::new(processor, gate))
        // Sampling is decided at the edge, before spans exist (see
        // `sampling`); the SDK only follows parents.
        .with_sampler(head.sdk_sampler())
        .with_resource(resource(args, instance))
        .build();
    let tracer = provider.tracer("replicast");
    global::set_text_map_propagator(opentelemetry::propagation::TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    // Only the spans of a message's journey are exported: h2, hyper and
    // tonic (the exporter's own calls included) would otherwise trace
    // themselves, and replicast's long-lived task spans (discovery, links)
    // are not operations.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Per-span extras that cost time on every span and add nothing to
        // a broadcast's trace: thread ids, source locations, busy/idle time.
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target(TRACE_SPANS, tracing::Level::INFO));
    let _ = tracing_subscriber::registry()
        .with(otel_layer)
        .with(logs::layer(format).with_filter(log_filter()))
        .try_init();
    // First set wins: one process, one telemetry configuration.
    let _ = HEAD_SAMPLER.set(head);
    TRACING.store(true, Ordering::Relaxed);
    tracing::info!(%endpoint, protocol = ?args.otlp_protocol, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The target of every span that is exported (the RPC, send and process
/// spans): `replicast::trace::*`. The log output does not look at them
/// unless RUST_LOG names them: formatting every field of every sampled span
/// for log lines nobody prints cost more than exporting it.
pub(crate) const TRACE_SPANS: &str = "replicast::trace";

fn log_filter() -> EnvFilter {
    let filter = default_log_filter();
    let named = std::env::var("RUST_LOG").is_ok_and(|v| v.contains(TRACE_SPANS));
    if named {
        return filter;
    }
    match format!("{TRACE_SPANS}=off").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn default_log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            "info,h2=warn,hyper=warn,tower=warn,hickory_proto=warn,hickory_net=warn,hickory_server=warn,\
             opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn",
        )
    })
}

fn resource(args: &TelemetryArgs, instance: &str) -> Resource {
    let mut attributes = vec![
        KeyValue::new("service.instance.id", instance.to_owned()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    ];
    for (key, value) in [
        ("k8s.pod.name", &args.pod_name),
        ("k8s.namespace.name", &args.pod_namespace),
        ("k8s.node.name", &args.node_name),
    ] {
        if let Some(value) = value.as_ref().filter(|v| !v.is_empty()) {
            attributes.push(KeyValue::new(key, value.clone()));
        }
    }
    attributes.extend(
        args.resource_attributes
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    Resource::builder_empty()
        .with_service_name(args.service_name.clone())
        .with_attributes(attributes)
        .build()
}
