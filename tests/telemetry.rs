//! One broadcast is one trace: three replicas as separate processes of the
//! real binary export spans over OTLP/gRPC to a receiver in this test.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{HEADLESS, Hosts, ZONE, client, wait_serving};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use replicast::{
    devdns::DevDns,
    proto::v1::{AckPolicy, BroadcastRequest},
};
use tokio::{net::TcpListener, process::Child};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// A span as received, with its resource's service.instance.id.
#[derive(Debug, Clone)]
struct Received {
    instance: String,
    namespace: Option<String>,
    service: Option<String>,
    span: Span,
}

#[derive(Debug, Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.spans.lock().unwrap().extend(received(request.into_inner()));
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Flattens an export request into spans with their resource's attributes.
fn received(request: ExportTraceServiceRequest) -> Vec<Received> {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
        let instance = string_attr(&resource, "service.instance.id").unwrap_or_default();
        let namespace = string_attr(&resource, "k8s.namespace.name");
        let service = string_attr(&resource, "service.name");
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Received {
                    instance: instance.clone(),
                    namespace: namespace.clone(),
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    spans
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attr(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    }
}

fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// A replica process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

#[tokio::test]
async fn one_broadcast_is_one_trace_across_three_processes() {
    // The OTLP receiver.
    let receiver = Receiver::default();
    let otlp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = otlp.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(otlp)),
    );

    // Three replicas plus one address where nothing listens (a failed hop).
    let mut hosts = Hosts::reserve(4).await;
    let dns = DevDns::start(hosts.dns_ip(), ZONE).await.unwrap();
    dns.set_addresses(HEADLESS, &hosts.ips).await.unwrap();
    let replicas: Vec<SocketAddr> = (0..3).map(|i| hosts.addr(i)).collect();
    let dead = hosts.addr(3);
    let mut processes = Vec::new();
    let log_path = std::env::temp_dir().join(format!("replicast-telemetry-{}.log", std::process::id()));
    for (i, addr) in replicas.iter().enumerate() {
        drop(hosts.listeners[i].take()); // the process binds it itself
        // Replica 0 logs hop failures (debug) as JSON to a file we read back.
        let (stderr, rust_log) = if i == 0 {
            (
                Stdio::from(std::fs::File::create(&log_path).unwrap()),
                "info,replicast::fanout=debug",
            )
        } else {
            (Stdio::null(), "info")
        };
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_replicast"))
            .args(["serve", "--listen", &addr.to_string(), "--peers-dns", HEADLESS])
            .args([
                "--dns-server",
                &dns.addr().to_string(),
                "--refresh-interval",
                "200ms",
            ])
            .args([
                "--otlp-endpoint",
                &format!("http://{otlp_addr}"),
                "--log-format",
                "json",
            ])
            .env("OTEL_SERVICE_NAME", "replicast-test")
            .env("POD_NAMESPACE", "tests")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start replicast");
        processes.push(Process(child));
    }
    drop(hosts.listeners[3].take());
    for addr in &replicas {
        wait_serving(*addr).await;
    }

    // The caller's span: what a traced client would send.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = Request::new(BroadcastRequest {
        topic: "cache.invalidate".into(),
        payload: b"user:42".to_vec().into(),
        ack: AckPolicy::Quorum as i32,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(5));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let response = client(replicas[0])
        .await
        .broadcast(request)
        .await
        .expect("QUORUM met by 3 of 4")
        .into_inner();

    // 1 Broadcast + 4 hops + 3 Deliver + 3 local deliveries.
    let trace_id_bytes = hex(trace_id);
    let ours = |r: &Receiver| -> Vec<Received> {
        r.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.span.trace_id == trace_id_bytes)
            .cloned()
            .collect()
    };
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while ours(&receiver).len() < 11 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if waited.is_err() {
        let all: Vec<(String, String)> = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.instance.clone(), s.span.name.clone()))
            .collect();
        panic!("not all 11 spans of the broadcast were exported within 20 s; received: {all:#?}");
    }
    let spans = ours(&receiver);
    let named = |name: &str| -> Vec<&Received> { spans.iter().filter(|s| s.span.name == name).collect() };

    let broadcast = named("replicast.v1.Replicast/Broadcast");
    assert_eq!(broadcast.len(), 1, "one Broadcast server span: {spans:#?}");
    let broadcast = broadcast[0];
    assert_eq!(
        broadcast.span.parent_span_id,
        hex(caller_span),
        "Broadcast continues the caller's trace"
    );
    assert_eq!(broadcast.span.kind, SpanKind::Server as i32);
    assert_eq!(broadcast.instance, replicas[0].to_string());
    assert_eq!(
        broadcast.service.as_deref(),
        Some("replicast-test"),
        "OTEL_SERVICE_NAME"
    );
    assert_eq!(
        broadcast.namespace.as_deref(),
        Some("tests"),
        "k8s.namespace.name from POD_NAMESPACE"
    );
    let a = &broadcast.span.attributes;
    assert_eq!(string_attr(a, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        string_attr(a, "rpc.service").as_deref(),
        Some("replicast.v1.Replicast")
    );
    assert_eq!(string_attr(a, "rpc.method").as_deref(), Some("Broadcast"));
    assert_eq!(int_attr(a, "rpc.grpc.status_code"), Some(0));
    assert_eq!(
        string_attr(a, "messaging.destination.name").as_deref(),
        Some("cache.invalidate")
    );
    assert_eq!(string_attr(a, "messaging.message.id"), Some(response.id.clone()));
    assert!(string_attr(a, "network.peer.address").is_some());

    let hops = named("replicast.v1.Replicast/DeliverStream");
    assert_eq!(hops.len(), 4, "one hop span per replica in DNS, self included");
    let mut hop_by_id = HashMap::new();
    for hop in &hops {
        assert_eq!(
            hop.span.parent_span_id, broadcast.span.span_id,
            "hops are children of the Broadcast"
        );
        assert_eq!(hop.instance, replicas[0].to_string(), "hops run on the origin");
        let a = &hop.span.attributes;
        assert_eq!(string_attr(a, "messaging.system").as_deref(), Some("replicast"));
        assert_eq!(
            string_attr(a, "messaging.operation.type").as_deref(),
            Some("send")
        );
        assert_eq!(string_attr(a, "messaging.message.id"), Some(response.id.clone()));
        let target = format!(
            "{}:{}",
            string_attr(a, "server.address").unwrap(),
            int_attr(a, "server.port").unwrap()
        );
        if target == dead.to_string() {
            let status = hop.span.status.as_ref().expect("a failed hop has a status");
            assert_eq!(
                status.code,
                StatusCode::Error as i32,
                "the hop to the dead peer is an error span"
            );
            assert_eq!(int_attr(a, "rpc.grpc.status_code"), Some(14), "UNAVAILABLE");
        } else {
            assert_eq!(int_attr(a, "rpc.grpc.status_code"), Some(0));
            let kind = if target == replicas[0].to_string() {
                SpanKind::Internal
            } else {
                SpanKind::Client
            };
            assert_eq!(hop.span.kind, kind as i32, "hop to {target}");
        }
        hop_by_id.insert(hop.span.span_id.clone(), target);
    }

    let delivers = named("replicast.v1.Replicast/Deliver");
    assert_eq!(delivers.len(), 3, "one Deliver span per live replica");
    let mut instances: Vec<String> = Vec::new();
    for deliver in &delivers {
        assert_eq!(deliver.span.kind, SpanKind::Server as i32);
        let parent_target = hop_by_id
            .get(&deliver.span.parent_span_id)
            .expect("Deliver is parented to a hop span");
        assert_eq!(
            parent_target, &deliver.instance,
            "each Deliver runs on the replica its hop targeted"
        );
        assert_eq!(
            string_attr(&deliver.span.attributes, "messaging.operation.type").as_deref(),
            Some("receive")
        );
        instances.push(deliver.instance.clone());
    }
    instances.sort();
    let mut expected: Vec<String> = replicas.iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(instances, expected, "a Deliver span on each service.instance.id");

    let locals = named("local delivery");
    assert_eq!(locals.len(), 3);
    let deliver_ids: Vec<&Vec<u8>> = delivers.iter().map(|d| &d.span.span_id).collect();
    for local in &locals {
        assert!(
            deliver_ids.contains(&&local.span.parent_span_id),
            "local delivery is a child of Deliver"
        );
        assert_eq!(
            int_attr(&local.span.attributes, "messaging.replicast.sequence"),
            Some(1)
        );
    }

    // The failed hop's log line carries the trace and the hop span's ids.
    let dead_hop = hops
        .iter()
        .find(|h| {
            h.span
                .status
                .as_ref()
                .is_some_and(|s| s.code == StatusCode::Error as i32)
        })
        .unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("hop failed"))
        .unwrap_or_else(|| panic!("a 'hop failed' debug line in:\n{logs}"));
    let json: serde_json::Value = serde_json::from_str(line).expect("JSON log lines");
    assert_eq!(json["trace_id"], trace_id, "{line}");
    assert_eq!(json["span_id"], to_hex(&dead_hop.span.span_id), "{line}");
    let _ = std::fs::remove_file(&log_path);

    drop(processes);
    server.abort();
    dns.shutdown().await;
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn http_protobuf_export_works_too() {
    use prost::Message as _;
    // An OTLP/HTTP receiver: POST /v1/traces with a protobuf body.
    let receiver = Receiver::default();
    let spans = receiver.spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let spans = spans.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("protobuf body");
                spans.lock().unwrap().extend(received(request));
                ExportTraceServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec()
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut hosts = Hosts::reserve(1).await;
    let addr = hosts.addr(0);
    drop(hosts.listeners[0].take());
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_replicast"))
        .args(["serve", "--listen", &addr.to_string()])
        .args([
            "--otlp-endpoint",
            &format!("http://{otlp_addr}"),
            "--otlp-protocol",
            "http/protobuf",
        ])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start replicast");
    let process = Process(child);
    wait_serving(addr).await;
    client(addr)
        .await
        .broadcast(BroadcastRequest {
            topic: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let names: Vec<String> = receiver
                .spans
                .lock()
                .unwrap()
                .iter()
                .map(|s| s.span.name.clone())
                .collect();
            if names.iter().any(|n| n == "replicast.v1.Replicast/Broadcast") && names.len() >= 4 {
                return names;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let names = waited.expect("Broadcast, hop, Deliver and local delivery spans over http/protobuf");
    assert!(names.iter().any(|n| n == "local delivery"), "{names:?}");
    drop(process);
    server.abort();
}
