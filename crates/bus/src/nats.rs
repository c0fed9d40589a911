//! Core NATS on the bus's connection: requests and their replies, subscriptions,
//! answers to requests, NATS micro services, and the connection's state. Other crates
//! reach the connection only through these (and the JetStream modules): none holds
//! the raw client.

use std::time::Duration;

use async_nats::{RequestErrorKind, Subject, ToSubject};
use bytes::Bytes;

use crate::Bus;

/// A request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nobody listens on the subject: the service is not up (or gone).
    #[error("no responders on {subject}")]
    NoResponders {
        /// The subject asked.
        subject: String,
    },
    /// No reply within the timeout: the responder is slow, stuck, or died mid-request.
    #[error("no reply on {subject} within {timeout:?}")]
    TimedOut {
        /// The subject asked.
        subject: String,
        /// How long the request waited.
        timeout: Duration,
    },
    /// The request could not be sent as it is (an invalid subject, a payload above the
    /// server's limit): asking again will not help.
    #[error("request on {subject} refused: {source}")]
    Refused {
        /// The subject asked.
        subject: String,
        /// The cause.
        #[source]
        source: async_nats::RequestError,
    },
    /// The connection failed the request: retry later.
    #[error("request on {subject} failed: {source}")]
    Failed {
        /// The subject asked.
        subject: String,
        /// The cause.
        #[source]
        source: async_nats::RequestError,
    },
}

/// A core NATS operation (subscribe, publish, flush, starting a service) failed: the
/// connection is closed or the subject is invalid.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Subscribing failed.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// The cause.
        #[source]
        source: async_nats::SubscribeError,
    },
    /// Publishing failed.
    #[error("cannot publish to {subject}: {source}")]
    Publish {
        /// The subject.
        subject: String,
        /// The cause.
        #[source]
        source: async_nats::PublishError,
    },
    /// The server did not confirm what was sent.
    #[error("cannot flush the connection: {0}")]
    Flush(#[source] async_nats::client::FlushError),
    /// A NATS micro service could not be registered.
    #[error("cannot start service {name}: {source}")]
    Service {
        /// The service name.
        name: String,
        /// The cause.
        #[source]
        source: async_nats::Error,
    },
}

impl Bus {
    /// Sends `payload` (with `headers`, when given) to `subject` and waits at most
    /// `timeout` for the first reply: one core request, nothing retried.
    pub async fn request(
        &self,
        subject: impl ToSubject,
        headers: Option<async_nats::HeaderMap>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<async_nats::Message, RequestError> {
        let subject = subject.to_subject();
        let mut request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        if let Some(h) = headers {
            request = request.headers(h);
        }
        self.client
            .send_request(subject.clone(), request)
            .await
            .map_err(|source| {
                let subject = subject.to_string();
                match source.kind() {
                    RequestErrorKind::NoResponders => RequestError::NoResponders { subject },
                    RequestErrorKind::TimedOut => RequestError::TimedOut { subject, timeout },
                    RequestErrorKind::InvalidSubject | RequestErrorKind::MaxPayloadExceeded => {
                        RequestError::Refused { subject, source }
                    }
                    RequestErrorKind::Other => RequestError::Failed { subject, source },
                }
            })
    }

    /// Sends `payload` to `subject` as a request that any number of processes may
    /// answer, and returns the subscription their answers arrive on (a fresh inbox,
    /// subscribed before the request goes out and flushed after it). Unsubscribe it,
    /// or drop it, when done listening.
    pub async fn request_many(
        &self,
        subject: impl ToSubject,
        payload: Bytes,
    ) -> Result<async_nats::Subscriber, CoreError> {
        let subject = subject.to_subject();
        let inbox = self.client.new_inbox();
        let answers = self.subscribe(inbox.clone()).await?;
        self.client
            .publish_with_reply(subject.clone(), inbox, payload)
            .await
            .map_err(|source| CoreError::Publish {
                subject: subject.to_string(),
                source,
            })?;
        // Best effort: answers come (or not) whether or not the flush is confirmed.
        let _ = self.client.flush().await;
        Ok(answers)
    }

    /// Subscribes to `subject` (core NATS: only messages published while subscribed).
    pub async fn subscribe(
        &self,
        subject: impl ToSubject,
    ) -> Result<async_nats::Subscriber, CoreError> {
        let subject = subject.to_subject();
        self.client
            .subscribe(subject.clone())
            .await
            .map_err(|source| CoreError::Subscribe {
                subject: subject.to_string(),
                source,
            })
    }

    /// Answers a request: publishes `payload` to its reply subject.
    pub async fn respond(&self, reply: Subject, payload: Bytes) -> Result<(), CoreError> {
        self.client
            .publish(reply.clone(), payload)
            .await
            .map_err(|source| CoreError::Publish {
                subject: reply.to_string(),
                source,
            })
    }

    /// Waits until the server has processed everything sent so far (subscriptions
    /// included: a subscription is live once this returns).
    pub async fn flush(&self) -> Result<(), CoreError> {
        self.client.flush().await.map_err(CoreError::Flush)
    }

    /// Registers the NATS micro service `name` (`version`, `description`) on this
    /// connection; add its endpoints to the returned service.
    pub async fn start_service(
        &self,
        name: &str,
        description: &str,
        version: &str,
    ) -> Result<async_nats::service::Service, CoreError> {
        use async_nats::service::ServiceExt;
        self.client
            .service_builder()
            .description(description)
            .start(name, version)
            .await
            .map_err(|source| CoreError::Service {
                name: name.to_owned(),
                source,
            })
    }

    /// How many times the connection was established (1 once connected; each
    /// reconnection adds one).
    pub fn connects(&self) -> u64 {
        self.client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Another handle on this process's connection, for a component that speaks the
    /// protocol over plain NATS by itself, the way a program in another language does
    /// (the control-plane client `flotilla_control::Client`), so that it shares this
    /// connection instead of opening a second one. Flotilla's own components go
    /// through the methods of [`Bus`] instead.
    pub fn shared_connection(&self) -> async_nats::Client {
        self.client.clone()
    }
}
