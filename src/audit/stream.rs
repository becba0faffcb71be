//! The audit trail's copy on the bus: a JetStream stream created with `deny_delete` and
//! `deny_purge`, one message per entry, the stream's sequence equal to the entry's.
//!
//! This file owns the stream's name and settings, appending an entry with the server checking
//! that it comes right after the last one (`Nats-Expected-Last-Sequence`), and reading the
//! stream back in order. Lines go in as the file holds them: authenticated, not secret (epochs,
//! fingerprints, actors and reasons), so a collector can ship them without the root key.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;

use super::AuditError;

/// How long one append or read may wait for the server.
const WAIT: Duration = Duration::from_secs(2);

pub use crate::bus::audit_stream_name as stream_name;

/// The subject its entries are published on.
pub fn stream_subject(prefix: &str) -> String {
    format!("{prefix}.audit.log")
}

/// An open audit stream.
#[derive(Debug, Clone)]
pub struct AuditStream {
    js: jetstream::Context,
    name: String,
    subject: String,
}

impl AuditStream {
    /// Creates the stream if it is not there yet, or opens it. `None` when the server the
    /// client is connected to has no JetStream.
    pub async fn open(
        client: &async_nats::Client,
        prefix: &str,
    ) -> Result<Option<Self>, AuditError> {
        // A client made with `retry_on_initial_connect` may not have its first INFO yet.
        tokio::time::timeout(WAIT, client.flush())
            .await
            .map_err(|_| AuditError::Stream {
                stream: stream_name(prefix),
                why: "the bus did not answer".to_owned(),
            })?
            .map_err(|e| AuditError::Stream {
                stream: stream_name(prefix),
                why: e.to_string(),
            })?;
        if !client.server_info().jetstream {
            return Ok(None);
        }
        let js = jetstream::new(client.clone());
        let name = stream_name(prefix);
        let subject = stream_subject(prefix);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            deny_delete: true,
            deny_purge: true,
            // Every entry stays: no limit on age, count or size.
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let s = AuditStream { js, name, subject };
        // Replicated like the keyring bucket where the bus is a cluster; a lone server refuses
        // three replicas and gets one.
        let mut last = None;
        for num_replicas in [3, 1] {
            let config = stream::Config {
                num_replicas,
                ..config.clone()
            };
            match tokio::time::timeout(WAIT, s.js.get_or_create_stream(config)).await {
                Ok(Ok(_)) => return Ok(Some(s)),
                Ok(Err(e)) => last = Some(s.err(e)),
                Err(_) => last = Some(s.err("no answer from JetStream")),
            }
        }
        Err(last.unwrap_or_else(|| s.err("no answer from JetStream")))
    }

    /// Opens an existing stream (for `audit verify` and `audit tail`).
    pub async fn existing(client: &async_nats::Client, prefix: &str) -> Result<Self, AuditError> {
        let s = AuditStream {
            js: jetstream::new(client.clone()),
            name: stream_name(prefix),
            subject: stream_subject(prefix),
        };
        tokio::time::timeout(WAIT, s.js.get_stream(&s.name))
            .await
            .map_err(|_| s.err("no answer from JetStream"))?
            .map_err(|e| s.err(e))?;
        Ok(s)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, why: impl std::fmt::Display) -> AuditError {
        AuditError::Stream {
            stream: self.name.clone(),
            why: why.to_string(),
        }
    }

    /// Appends entry `seq`, which the server accepts only as the message right after
    /// `seq - 1`. An entry already there, byte for byte (a retry after a lost ack), counts.
    pub async fn append(&self, seq: u64, line: &str) -> Result<(), AuditError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Sequence",
            (seq - 1).to_string().as_str(),
        );
        let published = async {
            self.js
                .publish_with_headers(self.subject.clone(), headers, line.to_owned().into())
                .await?
                .await
        };
        let outcome = tokio::time::timeout(WAIT, published)
            .await
            .map_err(|_| self.err("no answer from JetStream"))?;
        match outcome {
            Ok(ack) if ack.sequence == seq => Ok(()),
            Ok(ack) => Err(self.err(format!(
                "entry {seq} was stored as message {}",
                ack.sequence
            ))),
            Err(e) => match self.line(seq).await {
                Ok(Some(there)) if there == line.as_bytes() => Ok(()),
                _ => Err(self.err(format!("entry {seq} not stored: {e}"))),
            },
        }
    }

    /// Message `seq`, or `None` if the stream has none with that sequence.
    async fn line(&self, seq: u64) -> Result<Option<Vec<u8>>, AuditError> {
        let stream = tokio::time::timeout(WAIT, self.js.get_stream(&self.name))
            .await
            .map_err(|_| self.err("no answer from JetStream"))?
            .map_err(|e| self.err(e))?;
        match tokio::time::timeout(WAIT, stream.get_raw_message(seq)).await {
            Err(_) => Err(self.err("no answer from JetStream")),
            Ok(Ok(m)) => Ok(Some(m.payload.to_vec())),
            Ok(Err(e)) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Ok(Err(e)) => Err(self.err(e)),
        }
    }

    /// The number of messages and the last sequence.
    async fn state(&self) -> Result<(u64, u64, u64), AuditError> {
        let mut stream = tokio::time::timeout(WAIT, self.js.get_stream(&self.name))
            .await
            .map_err(|_| self.err("no answer from JetStream"))?
            .map_err(|e| self.err(e))?;
        let info = tokio::time::timeout(WAIT, stream.info())
            .await
            .map_err(|_| self.err("no answer from JetStream"))?
            .map_err(|e| self.err(e))?;
        Ok((
            info.state.messages,
            info.state.first_sequence,
            info.state.last_sequence,
        ))
    }

    /// Every line, in order. A stream whose first message is not 1, or with a gap, is
    /// reported: with deletes and purges denied, neither can happen to an intact stream.
    pub async fn lines(&self) -> Result<Vec<Vec<u8>>, AuditError> {
        let (messages, first, last) = self.state().await?;
        if messages == 0 {
            return Ok(Vec::new());
        }
        if first != 1 || messages != last {
            return Err(self.err(format!(
                "holds {messages} messages from {first} to {last}: entries were removed"
            )));
        }
        let mut out = Vec::with_capacity(usize::try_from(messages).unwrap_or(0));
        for seq in 1..=last {
            match self.line(seq).await? {
                Some(line) => out.push(line),
                None => return Err(self.err(format!("message {seq} is missing"))),
            }
        }
        Ok(out)
    }

    /// Lines from `from` on, as they are appended, until the stream or the connection ends.
    pub async fn follow(
        &self,
        from: u64,
    ) -> Result<impl futures::Stream<Item = Result<(u64, Vec<u8>), AuditError>> + use<>, AuditError>
    {
        use futures::StreamExt;
        let stream = tokio::time::timeout(WAIT, self.js.get_stream(&self.name))
            .await
            .map_err(|_| self.err("no answer from JetStream"))?
            .map_err(|e| self.err(e))?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| self.err(e))?;
        let messages = consumer.messages().await.map_err(|e| self.err(e))?;
        let this = self.clone();
        Ok(messages.map(move |m| {
            let m = m.map_err(|e| this.err(e))?;
            let seq = m.info().map_err(|e| this.err(e))?.stream_sequence;
            Ok((seq, m.payload.to_vec()))
        }))
    }
}
