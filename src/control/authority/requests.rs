//! Operators' requests: rotate, rewrap, revoke and keys as the acting authority serves them,
//! held for a while by a standby in case it takes office; and the client side the CLI uses.

use super::*;

/// Sends one sealed request to the authority and opens its sealed answer (the CLI's
/// `rotate`, `keys` and `revoke`).
pub async fn request(
    upstreams: Vec<String>,
    root: &crate::kek::Root,
    tls: &crate::tls::UpstreamFiles,
    subject: String,
    body: Body,
) -> Result<Body, String> {
    crate::tls::install_default_provider();
    let client = tls
        .apply(async_nats::ConnectOptions::new())
        .map_err(|e| e.to_string())?
        .name("cipherbus-cli")
        .connect(upstreams)
        .await
        .map_err(|e| format!("cannot reach the bus: {e}"))?;
    let control_key = root.control_key();
    let mut sealer = ControlSealer::new(crate::process::node_id("cli"), control_key)
        .map_err(|e| e.to_string())?;
    ask(&client, &mut sealer, control_key, subject, body).await
}

/// Sends one sealed request on an open connection and opens the sealed answer. A caller that
/// asks repeatedly keeps one sealer, so the authority remembers one sender, not one per request.
pub async fn ask(
    client: &async_nats::Client,
    sealer: &mut ControlSealer,
    control_key: &DataKey,
    subject: String,
    body: Body,
) -> Result<Body, String> {
    let sealed = sealer.seal(&subject, body).map_err(|e| e.to_string())?;
    // A rotation waits for acknowledgements, so the caller bounds the wait instead.
    let request = async_nats::Request::new()
        .payload(sealed.into())
        .timeout(None);
    let reply = client
        .send_request(subject, request)
        .await
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                "no key authority is running on this bus".to_owned()
            }
            _ => format!("the request failed: {e}"),
        })?;
    message::open(
        &mut Opener::new(),
        control_key,
        reply.subject.as_str(),
        &reply.payload,
    )
    .map(|m| m.body)
    .map_err(|e| format!("the answer was refused: {e}"))
}

/// Asks the authority on the bus to rotate and waits for its answer.
pub async fn request_rotation(
    upstreams: Vec<String>,
    root: &crate::kek::Root,
    prefix: &str,
    reason: &str,
) -> Result<Rotated, String> {
    let body = Body::RotateRequest {
        reason: reason.to_owned(),
    };
    let plain = crate::tls::UpstreamFiles::default();
    match request(upstreams, root, &plain, rotate_subject(prefix), body).await? {
        Body::RotateReply { error: Some(e), .. } => Err(e),
        Body::RotateReply {
            epoch,
            acked,
            laggards,
            error: None,
        } => Ok(Rotated {
            epoch,
            acked,
            laggards,
        }),
        _ => Err("the authority answered with something else".to_owned()),
    }
}

impl Authority {
    pub(super) async fn serve_rotate(
        &mut self,
        m: async_nats::Message,
        acks: &mut async_nats::Subscriber,
    ) {
        let reply = m.reply.clone();
        let subject = rotate_subject(&self.cfg.prefix);
        let result = match self.open(&subject, &m.payload) {
            Ok(Body::RotateRequest { reason }) => {
                self.rotate(&format!("requested: {reason}"), acks).await
            }
            Ok(_) => Err("not a rotate request".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        if let Some(reply) = reply {
            let body = match result {
                Ok(r) => Body::RotateReply {
                    epoch: r.epoch,
                    acked: r.acked,
                    laggards: r.laggards,
                    error: None,
                },
                Err(e) => Body::RotateReply {
                    epoch: 0,
                    acked: vec![],
                    laggards: vec![],
                    error: Some(e),
                },
            };
            self.reply(reply, body).await;
        }
    }

    pub(super) async fn serve_rewrap(&mut self, m: async_nats::Message) {
        let subject = rewrap_subject(&self.cfg.prefix);
        let body = match self.open(&subject, &m.payload) {
            Ok(Body::RewrapRequest {}) => match self.rewrap().await {
                Ok((rewrapped, seed)) => Body::RewrapReply {
                    rewrapped,
                    seed,
                    error: None,
                },
                Err(e) => Body::RewrapReply {
                    rewrapped: 0,
                    seed: false,
                    error: Some(e),
                },
            },
            Ok(_) => return,
            Err(e) => Body::RewrapReply {
                rewrapped: 0,
                seed: false,
                error: Some(e.to_string()),
            },
        };
        if let Some(reply) = m.reply {
            self.reply(reply, body).await;
        }
    }

    /// Wraps every data key that still opens, and the deployment seed, again under the root's
    /// newest version (after a KMS key rotation, or a migration from a file root), commits the
    /// keyring so every proxy stores the new wraps, and audits it. The keys do not change.
    pub(super) async fn rewrap(&mut self) -> Result<(u32, bool), String> {
        let refuse = |this: &mut Self, reason: &'static str, why: String| {
            this.metrics
                .rotations_refused
                .get_or_create(&ReasonLabel { reason })
                .inc();
            let why = format!("rewrap refused ({reason}): {why}");
            tracing::error!(reason, "{why}");
            this.audit(Event {
                kind: EventKind::Refused,
                epoch: None,
                fingerprint: None,
                actor: this.cfg.node.clone(),
                reason: why.clone(),
            });
            why
        };
        let snap = self.keyring.snapshot();
        let mut rewrapped = 0;
        for r in self.keyring.records() {
            if r.epoch == 1 || r.state == KeyState::Destroyed {
                continue;
            }
            let key = match self.keyring.lookup(&snap, r.epoch) {
                Ok(k) => k.key.clone(),
                Err(e) => {
                    let why = format!("epoch {} cannot be read: {}", r.epoch, e.reason());
                    return Err(refuse(self, "kms_unavailable", why));
                }
            };
            let wrapped = match self.keyring.root().wrap(r.epoch, &key) {
                Ok(w) => w,
                Err(e) => return Err(refuse(self, e.reason(), e.to_string())),
            };
            if let Err(e) = self.keyring.replace_wrapped(r.epoch, &wrapped) {
                return Err(refuse(self, "persist", e.to_string()));
            }
            rewrapped += 1;
        }
        drop(snap);
        let mut seed = false;
        if let Some(kek) = self.keyring.root().kek().cloned() {
            let scope = self.keyring.root().scope().to_owned();
            let stored = crate::kek::seed::read(&self.client, &self.cfg.prefix).await;
            let (old, revision) = match stored {
                Ok(Some(x)) => x,
                Ok(None) => return Err(refuse(self, "seed", "no deployment seed".into())),
                Err(e) => return Err(refuse(self, "seed", e)),
            };
            let again = crate::kek::blocking(|| {
                let key = old.unwrap(&*kek, &scope)?;
                crate::kek::seed::WrappedSeed::wrap(&*kek, &key, old.migrated, &scope)
            });
            let again = match again {
                Ok(s) => s,
                Err(e) => {
                    let reason = if e.is_unavailable() {
                        "kms_unavailable"
                    } else {
                        "kms_error"
                    };
                    return Err(refuse(self, reason, e.to_string()));
                }
            };
            let stored =
                crate::kek::seed::store(&self.client, &self.cfg.prefix, &again, Some(revision))
                    .await;
            if let Err(e) = stored {
                return Err(refuse(self, "seed", e));
            }
            seed = true;
        }
        if let Err(e) = self.commit_keyring(Change::None).await {
            return Err(refuse(self, "commit", e));
        }
        let reason = format!(
            "{rewrapped} data keys{} wrapped again under {}",
            if seed { " and the deployment seed" } else { "" },
            self.keyring.root().describe()
        );
        self.audit(Event {
            kind: EventKind::Rewrapped,
            epoch: None,
            fingerprint: None,
            actor: self.cfg.node.clone(),
            reason: reason.clone(),
        });
        tracing::info!(rewrapped, seed, "{reason}");
        Ok((rewrapped, seed))
    }

    pub(super) async fn serve_revoke(
        &mut self,
        m: async_nats::Message,
        acks: &mut async_nats::Subscriber,
    ) {
        let subject = revoke_subject(&self.cfg.prefix);
        let body = match self.open(&subject, &m.payload) {
            Ok(Body::RevokeRequest { epoch, reason }) => {
                match self.revoke(epoch, &reason, acks).await {
                    Ok(active) => Body::RevokeReply {
                        active,
                        error: None,
                    },
                    Err(e) => Body::RevokeReply {
                        active: 0,
                        error: Some(e),
                    },
                }
            }
            Ok(_) => Body::RevokeReply {
                active: 0,
                error: Some("not a revoke request".into()),
            },
            Err(e) => Body::RevokeReply {
                active: 0,
                error: Some(e.to_string()),
            },
        };
        if let Some(reply) = m.reply {
            self.reply(reply, body).await;
        }
    }

    /// Keeps an operator's request that arrived while standing by, with the lease revision
    /// current when it arrived. A request sent just after the holder died would otherwise go
    /// unanswered: the standby serves it on taking office if the holder never renewed after
    /// it arrived. A holder that renewed later was alive, and answered it.
    pub(super) async fn hold_request(&mut self, m: async_nats::Message) {
        if m.reply.is_none() {
            return;
        }
        let revision = match &self.control {
            Some(c) => {
                c.kv.entry(LEADER_KEY)
                    .await
                    .ok()
                    .flatten()
                    .map(|e| e.revision)
            }
            None => None,
        };
        while self.held_requests.len() >= MAX_HELD_REQUESTS {
            self.held_requests.pop_front();
        }
        self.held_requests.push_back(HeldRequest {
            at: Instant::now(),
            revision,
            msg: m,
        });
    }

    /// Serves the requests held while standing by that the last holder cannot have answered,
    /// oldest first.
    pub(super) async fn serve_held(&mut self, acks: &mut async_nats::Subscriber) {
        let rotate = rotate_subject(&self.cfg.prefix);
        let heard = self.standing_by_for.as_ref().map(|(_, at)| *at);
        while let Some(held) = self.held_requests.pop_front() {
            let unanswered = match (&self.control, self.taken_over) {
                // The lease moved on from the revision the request saw only by this takeover.
                (Some(_), Some(taken)) => held.revision.is_none_or(|r| r == taken),
                // Absent when taken: no holder ever answered.
                (Some(_), None) => held.revision.is_none(),
                (None, _) => heard.is_none_or(|h| held.at > h),
            };
            if held.at.elapsed() > HOLD_REQUESTS_FOR || !unanswered {
                continue;
            }
            if held.msg.subject.as_str() == rotate {
                self.serve_rotate(held.msg, acks).await;
            } else {
                self.serve_revoke(held.msg, acks).await;
            }
        }
    }

    pub(super) async fn reply(&mut self, reply: async_nats::Subject, body: Body) {
        if let Ok(sealed) = self.sealer.seal(reply.as_str(), body) {
            let _ = self.client.publish(reply, sealed.into()).await;
        }
    }
}
