//! Reading and tending streams by name: their state, one stored message by sequence
//! or the last on a subject, deleting one, and replaying a subject's messages in
//! order (the event log, a session's ledger, the dead letters).

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, State};
use futures::StreamExt;

use crate::Bus;

/// A stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream holds no such message (never stored, or deleted since).
    #[error("stream {stream} has no message {what}")]
    NoMessage {
        /// The stream.
        stream: String,
        /// The sequence or subject asked for.
        what: String,
    },
    /// The stream could not be reached, or does not exist: retry later, or run the
    /// topology bootstrap.
    #[error("stream {stream} unavailable: {source}")]
    Unavailable {
        /// The stream.
        stream: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StreamError {
    fn unavailable(stream: &str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable {
            stream: stream.to_owned(),
            source: Box::new(e),
        }
    }
}

/// A stream, by name. Cheap: holding one costs no request.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    stream: jetstream::stream::Stream<()>,
    name: String,
}

impl Bus {
    /// Looks stream `name` up (one stream info request, so a missing stream fails
    /// here).
    pub async fn stream(&self, name: &str) -> Result<StreamHandle, StreamError> {
        self.js
            .get_stream(name)
            .await
            .map_err(|e| StreamError::unavailable(name, e))?;
        self.stream_unchecked(name).await
    }

    /// Stream `name`, not looked up (no request: a missing stream fails at the first
    /// use).
    pub async fn stream_unchecked(&self, name: &str) -> Result<StreamHandle, StreamError> {
        let stream = self
            .js
            .get_stream_no_info(name)
            .await
            .map_err(|e| StreamError::unavailable(name, e))?;
        Ok(StreamHandle {
            stream,
            name: name.to_owned(),
        })
    }

    /// The dead-letter stream, looked up (see [`Bus::stream`]).
    pub async fn dead_letters(&self) -> Result<StreamHandle, StreamError> {
        self.stream(&self.names.stream_dlq()).await
    }

    /// The names of every role's inbox stream.
    pub async fn inbox_streams(&self) -> Result<Vec<String>, StreamError> {
        let prefix = self.names.stream_inbox_prefix();
        let mut names = self.js.stream_names();
        let mut out = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| StreamError::unavailable(&prefix, e))?;
            if name.starts_with(&prefix) {
                out.push(name);
            }
        }
        Ok(out)
    }
}

impl StreamHandle {
    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its current state: messages, first and last sequence (one stream info request).
    pub async fn state(&self) -> Result<State, StreamError> {
        self.stream
            .get_info()
            .await
            .map(|info| info.state)
            .map_err(|e| StreamError::unavailable(&self.name, e))
    }

    /// The message stored at `sequence`.
    pub async fn message(
        &self,
        sequence: u64,
    ) -> Result<jetstream::message::StreamMessage, StreamError> {
        self.stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| match e.kind() {
                LastRawMessageErrorKind::NoMessageFound => StreamError::NoMessage {
                    stream: self.name.clone(),
                    what: sequence.to_string(),
                },
                _ => StreamError::unavailable(&self.name, e),
            })
    }

    /// The last message stored on `subject`, if any.
    pub async fn last_message(
        &self,
        subject: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>, StreamError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(StreamError::unavailable(&self.name, e)),
        }
    }

    /// Deletes the message at `sequence`; [`StreamError::NoMessage`] when it is not
    /// there (deleted already).
    pub async fn delete_message(&self, sequence: u64) -> Result<(), StreamError> {
        match self.stream.delete_message(sequence).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Err(StreamError::NoMessage {
                stream: self.name.clone(),
                what: sequence.to_string(),
            }),
            Err(e) => Err(StreamError::unavailable(&self.name, e)),
        }
    }

    /// Every message stored on `subjects` (subject filters), oldest first, then those
    /// stored after, as they come: an ordered consumer of its own.
    pub async fn replay(&self, subjects: &[String]) -> Result<Replay, StreamError> {
        let config = match subjects {
            [one] => OrderedConfig {
                filter_subject: one.clone(),
                ..Default::default()
            },
            many => OrderedConfig {
                filter_subjects: many.to_vec(),
                ..Default::default()
            },
        };
        let consumer = self
            .stream
            .create_consumer(config)
            .await
            .map_err(|e| StreamError::unavailable(&self.name, e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| StreamError::unavailable(&self.name, e))?;
        Ok(Replay {
            messages,
            stream: self.name.clone(),
        })
    }

    /// Deliveries beyond the first, summed over the stream's consumers (each
    /// consumer's delivered sequence past the stream sequence it delivered up to).
    pub async fn redeliveries(&self) -> Result<u64, StreamError> {
        let mut consumers = self.stream.consumers();
        let mut total = 0;
        while let Some(c) = consumers.next().await {
            let c = c.map_err(|e| StreamError::unavailable(&self.name, e))?;
            total += c
                .delivered
                .consumer_sequence
                .saturating_sub(c.delivered.stream_sequence);
        }
        Ok(total)
    }
}

/// The messages of a [`StreamHandle::replay`].
pub struct Replay {
    messages: Ordered,
    stream: String,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Replay {
    /// The next message; `None` once the replay ends (the connection closed).
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, StreamError>> {
        let m = self.messages.next().await?;
        Some(m.map_err(|e| StreamError::unavailable(&self.stream, e)))
    }
}
