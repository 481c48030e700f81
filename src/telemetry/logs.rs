//! Log output: human-readable on a terminal, JSON lines otherwise, with the
//! OpenTelemetry `trace_id` and `span_id` on every line emitted inside a
//! traced span, so a log line leads to its trace and back.

use std::{fmt, io::IsTerminal};

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    Layer,
    field::Visit,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise (a pod's log collector).
    #[default]
    Auto,
    Text,
    Json,
}

/// The log layer for `format`, writing to stderr.
pub fn layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Auto => !terminal,
        LogFormat::Text => false,
        LogFormat::Json => true,
    };
    let base = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        base.event_format(JsonLine).boxed()
    } else {
        let text = tracing_subscriber::fmt::format()
            .with_target(false)
            .with_ansi(terminal);
        base.with_ansi(terminal).event_format(WithTraceIds(text)).boxed()
    }
}

/// The current span's OpenTelemetry ids, when it is traced.
fn trace_ids() -> Option<(String, String)> {
    if !super::tracing_enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let ids = span.span_context();
    ids.is_valid()
        .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
}

/// Text lines, prefixed with `trace_id=… span_id=…` inside a traced span.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some((trace_id, span_id)) = trace_ids() {
            write!(writer, "trace_id={trace_id} span_id={span_id} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// One JSON object per line: timestamp, level, target, message, the event's
/// fields, the names of the enclosing spans, and trace ids when traced.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        let mut fields = FieldsToJson(Map::new());
        event.record(&mut fields);
        if let Some(message) = fields.0.remove("message") {
            line.insert("message".into(), message);
        }
        line.extend(fields.0);
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|span| Value::from(span.name())).collect();
            if !spans.is_empty() {
                line.insert("spans".into(), spans.into());
            }
        }
        if let Some((trace_id, span_id)) = trace_ids() {
            line.insert("trace_id".into(), trace_id.into());
            line.insert("span_id".into(), span_id.into());
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct FieldsToJson(Map<String, Value>);

impl Visit for FieldsToJson {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}
