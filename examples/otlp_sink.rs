//! A minimal OTLP/gRPC trace receiver that counts what it gets: the
//! "collector" for `bench` runs with tracing on (it keeps up, so the cost
//! measured is replicast's own). Not a collector to deploy.
//!
//!     cargo run --release --example otlp_sink -- 127.0.0.1:4317

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tonic::{Request, Response, Status};

#[derive(Debug, Default, Clone)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let count: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(count as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".to_owned())
        .parse()?;
    let sink = Sink::default();
    let spans = sink.spans.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let now = spans.load(Ordering::Relaxed);
            if now != last {
                eprintln!("otlp_sink: {now} spans received");
                last = now;
            }
        }
    });
    eprintln!("otlp_sink: listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink).max_decoding_message_size(64 * 1024 * 1024))
        .serve(addr)
        .await?;
    Ok(())
}
