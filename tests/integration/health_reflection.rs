//! grpc.health.v1 and server reflection (v1 and v1alpha), as grpcurl uses them.

use crate::common;

use common::Cluster;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

#[tokio::test]
async fn health_is_serving_for_the_server_and_the_service() {
    let cluster = Cluster::start(1, &[]).await;
    let channel = Channel::from_shared(format!("http://{}", cluster.addr(0)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "replicast.v1.Replicast"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    cluster.shutdown().await;
}

#[tokio::test]
async fn reflection_v1_lists_and_describes_the_service() {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let cluster = Cluster::start(1, &[]).await;
    let channel = Channel::from_shared(format!("http://{}", cluster.addr(0)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "replicast.v1.Replicast".into(),
            )),
        },
    ];
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    match responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
    {
        MessageResponse::ListServicesResponse(list) => {
            let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            for wanted in ["replicast.v1.Replicast", "grpc.health.v1.Health"] {
                assert!(names.iter().any(|n| n == wanted), "{wanted} listed in {names:?}");
            }
        }
        other => panic!("expected a service list, got {other:?}"),
    }
    match responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
    {
        MessageResponse::FileDescriptorResponse(files) => {
            assert!(
                !files.file_descriptor_proto.is_empty(),
                "the descriptor of replicast.proto"
            );
        }
        other => panic!("expected a file descriptor, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn reflection_v1alpha_works_for_grpcurl_1_8() {
    use v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let cluster = Cluster::start(1, &[]).await;
    let channel = Channel::from_shared(format!("http://{}", cluster.addr(0)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "replicast.v1.BroadcastRequest".into(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    match responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
    {
        MessageResponse::FileDescriptorResponse(files) => assert!(!files.file_descriptor_proto.is_empty()),
        other => panic!("expected a file descriptor, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn reflection_can_be_turned_off_and_health_stays() {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let cluster = Cluster::start(1, &["--reflection", "false"]).await;
    let channel = Channel::from_shared(format!("http://{}", cluster.addr(0)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let status = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect_err("no reflection service");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert_eq!(
        common::health_status(cluster.addr(0), "").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
        "health is served whatever the flags"
    );
    cluster.shutdown().await;
}
