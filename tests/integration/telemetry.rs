//! One broadcast is one trace: three replicas as separate processes of the
//! real binary export spans over OTLP/gRPC to a receiver in this test.

use crate::common;

use std::{
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

/// A lone replica process on a reserved loopback address with `flags`,
/// logging at `rust_log` to `stderr`; returned once SERVING.
async fn lone_replica(flags: &[&str], rust_log: &str, stderr: Stdio) -> (Process, SocketAddr) {
    let mut hosts = Hosts::reserve(1).await;
    let addr = hosts.addr(0);
    drop(hosts.listeners[0].take()); // the process binds it itself
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_replicast"))
        .args(["serve", "--listen", &addr.to_string()])
        .args(flags)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("start replicast");
    let process = Process(child);
    wait_serving(addr).await;
    (process, addr)
}

/// An OTLP/gRPC receiver on loopback, and its address.
async fn start_receiver() -> (
    Receiver,
    SocketAddr,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let receiver = Receiver::default();
    let otlp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = otlp.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(otlp)),
    );
    (receiver, otlp_addr, server)
}

#[tokio::test]
async fn one_broadcast_is_one_trace_across_three_processes() {
    let (receiver, otlp_addr, server) = start_receiver().await;

    // Three replicas plus one address where nothing listens (a failed hop).
    let mut hosts = Hosts::reserve(4).await;
    let dns = DevDns::start(hosts.dns_ip(), ZONE).await.unwrap();
    dns.set_addresses(HEADLESS, &hosts.ips).await.unwrap();
    let replicas: Vec<SocketAddr> = (0..3).map(|i| hosts.addr(i)).collect();
    let dead = hosts.addr(3);
    let mut processes = Vec::new();
    let log_paths: Vec<std::path::PathBuf> = (0..3)
        .map(|i| std::env::temp_dir().join(format!("replicast-telemetry-{}-{i}.log", std::process::id())))
        .collect();
    for (i, addr) in replicas.iter().enumerate() {
        drop(hosts.listeners[i].take()); // the process binds it itself
        // Replicas 0 and 1 log every step of every message (debug), replica
        // 2 at info, as JSON to files read back below.
        let stderr = Stdio::from(std::fs::File::create(&log_paths[i]).unwrap());
        let rust_log = if i < 2 { "info,replicast=debug" } else { "info" };
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

    // The fan-out shape of the messaging conventions: the Broadcast, one
    // send span, one process span per replica that delivered (3 of 4; the
    // dead peer is an event on the send span, not a span).
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
        while ours(&receiver).len() < 5 {
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
        panic!("not all 5 spans of the broadcast were exported within 20 s; received: {all:#?}");
    }
    // Anything late would show up by now too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans = ours(&receiver);
    assert_eq!(spans.len(), 5, "Broadcast, send and 3 process spans: {spans:#?}");
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
    assert!(string_attr(a, "network.peer.address").is_some());

    let send = named("send cache.invalidate");
    assert_eq!(send.len(), 1, "one send span per Broadcast: {spans:#?}");
    let send = send[0];
    assert_eq!(send.span.kind, SpanKind::Producer as i32);
    assert_eq!(
        send.span.parent_span_id, broadcast.span.span_id,
        "send is the Broadcast's child"
    );
    assert_eq!(send.instance, replicas[0].to_string(), "send runs on the origin");
    let a = &send.span.attributes;
    assert_eq!(string_attr(a, "messaging.system").as_deref(), Some("replicast"));
    assert_eq!(
        string_attr(a, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        string_attr(a, "messaging.destination.name").as_deref(),
        Some("cache.invalidate")
    );
    assert_eq!(string_attr(a, "messaging.message.id"), Some(response.id.clone()));
    assert_eq!(
        int_attr(a, "replicast.replicas"),
        Some(4),
        "self, two live peers, one dead"
    );
    assert_eq!(int_attr(a, "replicast.acked"), Some(3));
    assert_eq!(int_attr(a, "replicast.required"), Some(3), "QUORUM of 4");
    // QUORUM was met before the dead peer's hop gave up: its receipt was
    // pending, and its failure is recorded when it comes (the send span
    // ends with the last hop).
    let failed: Vec<_> = send
        .span
        .events
        .iter()
        .filter(|e| e.name == "replica failed")
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "the dead peer is one event: {:#?}",
        send.span.events
    );
    assert_eq!(
        string_attr(&failed[0].attributes, "replicast.peer"),
        Some(dead.to_string())
    );
    assert_eq!(
        int_attr(&failed[0].attributes, "rpc.grpc.status_code"),
        Some(14),
        "UNAVAILABLE"
    );
    assert!(
        send.span
            .status
            .as_ref()
            .is_none_or(|s| s.code != StatusCode::Error as i32),
        "the policy was met: the send span is no error"
    );

    let processes = named("process cache.invalidate");
    assert_eq!(processes.len(), 3, "one process span per replica that delivered");
    let mut instances: Vec<String> = Vec::new();
    for process in &processes {
        assert_eq!(process.span.kind, SpanKind::Consumer as i32);
        assert_eq!(
            process.span.parent_span_id, send.span.span_id,
            "every delivery, the origin's own included, is parented to the send span"
        );
        let a = &process.span.attributes;
        assert_eq!(
            string_attr(a, "messaging.operation.type").as_deref(),
            Some("process")
        );
        assert_eq!(string_attr(a, "messaging.message.id"), Some(response.id.clone()));
        assert_eq!(int_attr(a, "messaging.replicast.sequence"), Some(1));
        instances.push(process.instance.clone());
    }
    instances.sort();
    let mut expected: Vec<String> = replicas.iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(instances, expected, "a process span on each service.instance.id");

    // Logs: at debug, one line per message per step, each with the trace
    // and the span it belongs to; the failed hop's too. At info, nothing
    // per message.
    let logs = |i: usize| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log_paths[i])
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a JSON log line ({e}): {l}")))
            .collect()
    };
    let send_span = to_hex(&send.span.span_id);
    let process_span = |i: usize| {
        let process = processes
            .iter()
            .find(|p| p.instance == replicas[i].to_string())
            .unwrap();
        to_hex(&process.span.span_id)
    };
    let steps = |i: usize, step: &str| -> Vec<serde_json::Value> {
        logs(i)
            .into_iter()
            .filter(|l| l["message"] == step && l["trace_id"] == trace_id)
            .collect()
    };
    let origin = logs(0);
    let accepted = steps(0, "accepted");
    assert_eq!(
        accepted.len(),
        1,
        "one 'accepted' line on the origin: {origin:#?}"
    );
    assert_eq!(accepted[0]["message.id"], response.id.as_str());
    assert_eq!(accepted[0]["span_id"], send_span, "in the send span");
    let sent = steps(0, "sent to peer");
    assert!(
        sent.len() >= 2
            && sent
                .iter()
                .all(|l| l["span_id"] == send_span && l["message.id"] == response.id.as_str()),
        "a 'sent to peer' line per live peer, in the send span: {origin:#?}"
    );
    for i in [0, 1] {
        let delivered = steps(i, "delivered");
        assert_eq!(
            delivered.len(),
            1,
            "replica {i} delivered it once: {:#?}",
            logs(i)
        );
        assert_eq!(
            delivered[0]["span_id"],
            process_span(i),
            "in replica {i}'s process span"
        );
        assert_eq!(delivered[0]["sequence"], 1);
    }
    let failed = steps(0, "hop failed");
    assert!(
        failed.iter().any(|l| l["span_id"] == send_span),
        "the dead peer's failure, in the send span: {origin:#?}"
    );
    let quiet = logs(2);
    assert!(
        quiet.iter().all(|l| !l.to_string().contains(&response.id)),
        "nothing per message at info: {quiet:#?}"
    );
    for path in &log_paths {
        let _ = std::fs::remove_file(path);
    }

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

    let endpoint = format!("http://{otlp_addr}");
    let (process, addr) = lone_replica(
        &["--otlp-endpoint", &endpoint, "--otlp-protocol", "http/protobuf"],
        "info",
        Stdio::null(),
    )
    .await;
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
            if names.iter().any(|n| n == "replicast.v1.Replicast/Broadcast") && names.len() >= 3 {
                return names;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let names = waited.expect("Broadcast, send and process spans over http/protobuf");
    assert!(names.iter().any(|n| n == "send t"), "{names:?}");
    assert!(names.iter().any(|n| n == "process t"), "{names:?}");
    drop(process);
    server.abort();
}

/// The app behind a webhook: records the `traceparent` of each POST.
async fn traceparent_recorder() -> (SocketAddr, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route(
        "/events",
        axum::routing::post({
            let seen = seen.clone();
            move |headers: axum::http::HeaderMap| async move {
                let traceparent = headers.get("traceparent").map_or("", |v| v.to_str().unwrap());
                seen.lock().unwrap().push(traceparent.to_owned());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let task = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (addr, seen, task)
}

#[tokio::test]
async fn a_webhook_post_continues_the_broadcasts_trace_into_the_app() {
    let (receiver, otlp_addr, server) = start_receiver().await;
    let (app, seen, app_task) = traceparent_recorder().await;
    let log_path = std::env::temp_dir().join(format!("replicast-webhook-trace-{}.log", std::process::id()));
    let (webhook, endpoint) = (format!("http://{app}/events"), format!("http://{otlp_addr}"));
    let (_process, addr) = lone_replica(
        &[
            "--webhook",
            &webhook,
            "--otlp-endpoint",
            &endpoint,
            "--log-format",
            "json",
        ],
        "info,replicast=debug",
        Stdio::from(std::fs::File::create(&log_path).unwrap()),
    )
    .await;

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut request = Request::new(BroadcastRequest {
        topic: "cache.invalidate".into(),
        payload: b"user:42".to_vec().into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01").parse().unwrap(),
    );
    client(addr).await.broadcast(request).await.expect("delivered");

    common::eventually("the app to get the POST", Duration::from_secs(10), || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    let traceparent = seen.lock().unwrap()[0].clone();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "a W3C traceparent on the POST: {traceparent:?}");
    assert_eq!(
        parts[1], trace_id,
        "the app's handler joins the Broadcast's trace"
    );
    // Its parent is the replica's delivery (process) span of that trace.
    let parent = hex(parts[2]);
    common::eventually(
        "the delivery span to be exported",
        Duration::from_secs(20),
        || async {
            receiver.spans.lock().unwrap().iter().any(|s| {
                s.span.span_id == parent
                    && s.span.trace_id == hex(trace_id)
                    && s.span.name.starts_with("process")
            })
        },
    )
    .await;
    // The POST's debug line carries the trace and the delivery span.
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let posted = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "POSTed to the app")
        .unwrap_or_else(|| panic!("a 'POSTed to the app' line in:\n{logs}"));
    assert_eq!(posted["trace_id"], trace_id, "{posted}");
    assert_eq!(posted["span_id"], parts[2], "{posted}");
    let _ = std::fs::remove_file(&log_path);
    app_task.abort();
    server.abort();
}

#[tokio::test]
async fn an_http_api_broadcast_continues_the_callers_trace() {
    let (receiver, otlp_addr, server) = start_receiver().await;
    let api = common::free_port_on(std::net::Ipv4Addr::LOCALHOST.into()).await;
    let (api_flag, endpoint) = (api.to_string(), format!("http://{otlp_addr}"));
    let (_process, _) = lone_replica(
        &["--http-listen", &api_flag, "--otlp-endpoint", &endpoint],
        "info",
        Stdio::null(),
    )
    .await;

    let trace_id = "5b8efff798038103d269b633813fc60c";
    let caller = "eee19b7ec3c1b174";
    let answer = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{api}/v1/broadcast"))
        .header("traceparent", format!("00-{trace_id}-{caller}-01"))
        .header("content-type", "application/json")
        .body(r#"{"topic":"cache.invalidate","payload":"eA=="}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // The API call's server span continues the caller's; the send span is
    // its child, as under a gRPC Broadcast.
    let ours = || -> Vec<Span> {
        receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.span.trace_id == hex(trace_id))
            .map(|s| s.span.clone())
            .collect()
    };
    common::eventually("the API call's spans", Duration::from_secs(20), || async {
        ours().len() >= 3
    })
    .await;
    let spans = ours();
    let api_span = spans
        .iter()
        .find(|s| s.name == "POST /v1/broadcast")
        .unwrap_or_else(|| panic!("a POST /v1/broadcast span: {spans:#?}"));
    assert_eq!(
        api_span.parent_span_id,
        hex(caller),
        "it continues the caller's trace"
    );
    assert_eq!(api_span.kind, SpanKind::Server as i32);
    let send = spans
        .iter()
        .find(|s| s.name == "send cache.invalidate")
        .unwrap_or_else(|| panic!("a send span: {spans:#?}"));
    assert_eq!(
        send.parent_span_id, api_span.span_id,
        "the send span is the API call's child"
    );
    server.abort();
}
