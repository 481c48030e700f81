//! The app a webhook POSTs to: a real HTTP server (axum) on loopback that
//! records every POST and answers by a script, optionally held at a gate.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use bytes::Bytes;
use tokio::{net::TcpListener, sync::Semaphore};

use super::eventually;

/// One POST the app received.
#[derive(Debug, Clone)]
pub struct Posted {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Posted {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

/// How the app answers a message id, attempt by attempt (then 200).
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    RetryAfter(u16, u64),
}

#[derive(Default)]
pub struct AppState {
    pub posted: Mutex<Vec<Posted>>,
    pub script: Mutex<HashMap<String, VecDeque<Reply>>>,
    /// Answers to any id before the script (an app still starting).
    pub first: Mutex<VecDeque<Reply>>,
    /// When set, each POST takes a permit before it is answered.
    pub gate: Option<Arc<Semaphore>>,
    /// POSTs that arrived, answered or still held at the gate.
    pub arrived: std::sync::atomic::AtomicUsize,
}

/// The app a replica POSTs to.
pub struct App {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    pub async fn start_on(listener: TcpListener, state: AppState) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(state);
        let router = axum::Router::new()
            .route("/events", axum::routing::post(hook))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self { addr, state, task }
    }

    pub async fn start(ip: std::net::IpAddr, state: AppState) -> Self {
        Self::start_on(TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap(), state).await
    }

    pub fn url(&self, fragment: &str) -> String {
        format!("http://{}/events{fragment}", self.addr)
    }

    pub fn posted(&self) -> Vec<Posted> {
        self.state.posted.lock().unwrap().clone()
    }

    /// The POSTs that were answered 2xx, by id, in order.
    pub async fn wait_for(&self, count: usize) -> Vec<Posted> {
        eventually(
            &format!("{count} POSTs at {}", self.addr),
            Duration::from_secs(15),
            || async { self.posted().len() >= count },
        )
        .await;
        self.posted()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    state.arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    if let Some(gate) = &state.gate {
        gate.acquire().await.unwrap().forget();
    }
    state.posted.lock().unwrap().push(Posted {
        headers: headers.clone(),
        body,
        at: Instant::now(),
    });
    let id = headers
        .get("ce-id")
        .map_or("", |v| v.to_str().unwrap())
        .to_owned();
    let reply = state.first.lock().unwrap().pop_front().or_else(|| {
        state
            .script
            .lock()
            .unwrap()
            .get_mut(&id)
            .and_then(VecDeque::pop_front)
    });
    match reply {
        None => (StatusCode::OK, HeaderMap::new()),
        Some(Reply::Status(code)) => (StatusCode::from_u16(code).unwrap(), HeaderMap::new()),
        Some(Reply::RetryAfter(code, secs)) => {
            let mut headers = HeaderMap::new();
            headers.insert("retry-after", secs.to_string().parse().unwrap());
            (StatusCode::from_u16(code).unwrap(), headers)
        }
    }
}
