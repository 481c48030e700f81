//! `Publish`: many Broadcasts in flight on one stream.
//!
//! [`PublishStream`] is the response stream itself, with no task of its
//! own: each time tonic polls it for the next response it reads requests
//! while fewer than `--publish-window` messages are in flight, starts a
//! Broadcast for each (the same [`ReplicastService::broadcast_one`] the
//! unary RPC calls), and yields the responses in completion order. At the
//! window it stops reading, so HTTP/2 flow control pushes back on the
//! client; a client that stops reading responses stops its own requests the
//! same way. Nothing accepted is dropped: the hops of a Broadcast live in
//! the links, whatever happens to this stream.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, future::BoxFuture, stream::FuturesUnordered};
use tonic::{Code, Status, Streaming};

use crate::{
    error::{Error, publish_response},
    lifecycle::Phase,
    proto::v1::{PublishRequest, PublishResponse},
    service::Caller,
    service::ReplicastService,
    validate::ValidationError,
};

/// The responses of one Publish call. See the module documentation.
pub struct PublishStream {
    service: ReplicastService,
    /// Who calls: each message's topic is checked against its permissions
    /// and counted against its rate.
    caller: Caller,
    /// `None` once the client finished sending (or its stream broke).
    requests: Option<Streaming<PublishRequest>>,
    in_flight: FuturesUnordered<BoxFuture<'static, PublishResponse>>,
    /// Answers that need no Broadcast (a bad message, draining).
    ready: VecDeque<PublishResponse>,
    window: usize,
    /// The Publish call's server span: each message's send span is its child.
    span: tracing::Span,
    /// Resolves when the replica starts draining.
    draining: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The stream has ended (after its last response or error).
    done: bool,
    /// Why the client's side broke (a message that does not decode): the
    /// last thing the stream says, after every accepted message's answer.
    broken: Option<Status>,
}

impl PublishStream {
    pub(crate) fn new(
        service: ReplicastService,
        caller: Caller,
        requests: Streaming<PublishRequest>,
        window: usize,
        span: tracing::Span,
    ) -> Self {
        let draining: Option<Pin<Box<dyn Future<Output = ()> + Send>>> =
            Some(Box::pin(service.phase().reached(Phase::Draining)));
        // Asked once per stream, not per message: an unsampled stream's
        // messages look at a disabled span only.
        let span = if crate::telemetry::spans::is_sampled(&span) {
            span
        } else {
            tracing::Span::none()
        };
        Self {
            service,
            caller,
            requests: Some(requests),
            in_flight: FuturesUnordered::new(),
            ready: VecDeque::new(),
            window: window.max(1),
            span,
            draining,
            done: false,
            broken: None,
        }
    }

    fn is_draining(&self) -> bool {
        self.draining.is_none()
    }

    /// Starts one message, or answers it at once.
    fn admit(&mut self, request: PublishRequest) {
        let tag = request.tag;
        if self.is_draining() {
            self.ready
                .push_back(publish_response(tag, Err(Error::ShuttingDown)));
            return;
        }
        let timeout = match request.timeout.map(Duration::try_from) {
            None => None,
            Some(Ok(timeout)) if !timeout.is_zero() => Some(timeout),
            Some(_) => {
                let invalid = ValidationError::MalformedTimeout;
                self.ready.push_back(publish_response(tag, Err(invalid.into())));
                return;
            }
        };
        let Some(broadcast) = request.broadcast else {
            let missing = ValidationError::MissingField { field: "broadcast" };
            self.ready.push_back(publish_response(tag, Err(missing.into())));
            return;
        };
        let service = self.service.clone();
        let span = self.span.clone();
        let caller = self.caller.clone();
        self.in_flight.push(Box::pin(async move {
            let ack = broadcast.ack;
            let result = service.broadcast_one(broadcast, &caller, timeout, &span).await;
            service.record_broadcast(ack, &result);
            publish_response(tag, result)
        }));
    }
}

impl Stream for PublishStream {
    type Item = Result<PublishResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(draining) = this.draining.as_mut()
            && draining.as_mut().poll(cx).is_ready()
        {
            this.draining = None;
        }
        // Read while there is room (and, draining, only what is already
        // there: each gets UNAVAILABLE).
        while this.in_flight.len() < this.window
            && let Some(requests) = this.requests.as_mut()
        {
            match Pin::new(requests).poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => this.admit(request),
                // The client is gone or sent garbage: finish what it started.
                Poll::Ready(Some(Err(status))) => {
                    tracing::debug!(%status, "publish stream broke");
                    this.broken = Some(crate::request_errors::malformed(status));
                    this.requests = None;
                }
                Poll::Ready(None) => this.requests = None,
                Poll::Pending => break,
            }
            if !this.ready.is_empty() {
                break;
            }
        }
        if let Some(response) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(response)));
        }
        match Pin::new(&mut this.in_flight).poll_next(cx) {
            Poll::Ready(Some(response)) => return Poll::Ready(Some(Ok(response))),
            Poll::Ready(None) | Poll::Pending => {}
        }
        if this.in_flight.is_empty() {
            if this.requests.is_none() {
                this.done = true;
                return Poll::Ready(this.broken.take().map(Err));
            }
            if this.is_draining() {
                // Every accepted message is answered; what the client sends
                // from here on goes to another replica.
                this.done = true;
                return Poll::Ready(Some(Err(Status::new(
                    Code::Unavailable,
                    Error::ShuttingDown.to_string(),
                ))));
            }
        }
        Poll::Pending
    }
}

impl std::fmt::Debug for PublishStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishStream")
            .field("in_flight", &self.in_flight.len())
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}
