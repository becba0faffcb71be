//! INFO rewriting: what the agent is told about the server it thinks it talks to.
//!
//! This module owns the rules from `NATS-PROTOCOL.md` for every INFO the upstream sends (on
//! accept, after CONNECT, and async): strip the cluster URLs that would let agents bypass the
//! proxy, shrink `max_payload` by the envelope overhead, and make `host`, `port` and the
//! `tls_*` fields describe the proxy's listener. Everything else passes unchanged, the `nonce`
//! above all, so the server can still authenticate the agent.

use serde_json::{Map, Value};

/// What the proxy's listener offers, for the `tls_*` fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerTls {
    pub required: bool,
    pub available: bool,
    pub verify: bool,
}

/// The proxy side of an INFO rewrite.
#[derive(Debug, Clone)]
pub struct InfoRewrite {
    pub host: String,
    pub port: u16,
    pub tls: ListenerTls,
    /// Bytes the envelope adds to a sealed payload.
    pub overhead: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InfoError {
    #[error("upstream INFO is not a JSON object")]
    NotJson,
    #[error("upstream INFO has no usable max_payload")]
    MaxPayload,
    #[error("upstream max_payload {0} leaves no room for the envelope")]
    TooSmall(u64),
}

/// The rewritten INFO JSON and the `max_payload` now advertised to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub json: Vec<u8>,
    pub max_payload: usize,
    /// The server is entering lame-duck mode.
    pub lame_duck: bool,
    /// The server takes header ops (`headers` in its INFO).
    pub headers: bool,
}

impl InfoRewrite {
    pub fn apply(&self, upstream_json: &[u8]) -> Result<Rewritten, InfoError> {
        let mut info: Map<String, Value> =
            serde_json::from_slice(upstream_json).map_err(|_| InfoError::NotJson)?;
        info.remove("connect_urls");
        info.remove("ws_connect_urls");
        let upstream_max = info
            .get("max_payload")
            .and_then(Value::as_u64)
            .ok_or(InfoError::MaxPayload)?;
        let max_payload = upstream_max
            .checked_sub(self.overhead as u64)
            .filter(|m| *m > 0)
            .ok_or(InfoError::TooSmall(upstream_max))?;
        info.insert("max_payload".into(), Value::from(max_payload));
        info.insert("host".into(), Value::from(self.host.clone()));
        info.insert("port".into(), Value::from(self.port));
        // Advertise only what the listener really serves: clients decide on these fields.
        for (field, on) in [
            ("tls_required", self.tls.required),
            ("tls_available", self.tls.available),
            ("tls_verify", self.tls.verify),
        ] {
            if on {
                info.insert(field.into(), Value::Bool(true));
            } else {
                info.remove(field);
            }
        }
        let lame_duck = info.get("ldm").and_then(Value::as_bool).unwrap_or(false);
        let headers = info
            .get("headers")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let json = serde_json::to_vec(&info).map_err(|_| InfoError::NotJson)?;
        Ok(Rewritten {
            json,
            max_payload: max_payload as usize,
            lame_duck,
            headers,
        })
    }
}

/// What an agent's CONNECT says about header ops, read as nats-server reads it: the `headers`
/// field, matched regardless of case with the last one winning, as Go's JSON decoding does.
/// `None` when the field is absent: the server decodes a CONNECT into the options it already
/// has, so the setting stays as it was (off, before any CONNECT). A CONNECT that does not
/// decode gets the connection closed by the server anyway.
pub fn connect_headers(connect_json: &[u8]) -> Option<bool> {
    // Go's decoder takes invalid UTF-8 inside strings, as U+FFFD; so does this.
    let text = String::from_utf8_lossy(connect_json);
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&text) else {
        return None;
    };
    fields
        .iter()
        .rfind(|(k, _)| k.eq_ignore_ascii_case("headers"))
        .and_then(|(_, v)| v.as_bool())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> InfoRewrite {
        InfoRewrite {
            host: "127.0.0.1".into(),
            port: 4333,
            tls: ListenerTls::default(),
            overhead: 48,
        }
    }

    #[test]
    fn strips_urls_shrinks_payload_and_keeps_the_rest() {
        let upstream = br#"{"server_id":"NABC","version":"2.15.1","proto":1,"host":"0.0.0.0","port":4222,"headers":true,"max_payload":1048576,"nonce":"abc-nonce","auth_required":true,"tls_required":true,"tls_verify":true,"connect_urls":["10.0.0.1:4222"],"ws_connect_urls":["10.0.0.1:80"],"jetstream":true,"client_id":5,"ldm":true}"#;
        let out = rw().apply(upstream).unwrap();
        let v: Map<String, Value> = serde_json::from_slice(&out.json).unwrap();
        assert_eq!(out.max_payload, 1048576 - 48);
        assert_eq!(v["max_payload"], 1048576 - 48);
        assert_eq!(v["nonce"], "abc-nonce");
        assert_eq!(v["host"], "127.0.0.1");
        assert_eq!(v["port"], 4333);
        assert_eq!(v["server_id"], "NABC");
        assert_eq!(v["auth_required"], true);
        assert_eq!(v["jetstream"], true);
        assert_eq!(v["client_id"], 5);
        assert!(!v.contains_key("connect_urls"));
        assert!(!v.contains_key("ws_connect_urls"));
        assert!(!v.contains_key("tls_required"));
        assert!(!v.contains_key("tls_verify"));
        assert!(out.lame_duck);
        // Field order is kept, so the agent sees the server's layout.
        let keys: Vec<&String> = v.keys().collect();
        assert_eq!(keys[0], "server_id");
    }

    #[test]
    fn tls_fields_describe_the_listener() {
        let mut r = rw();
        r.tls = ListenerTls {
            required: false,
            available: true,
            verify: false,
        };
        let out = r.apply(br#"{"max_payload":100}"#).unwrap();
        let v: Map<String, Value> = serde_json::from_slice(&out.json).unwrap();
        assert_eq!(v["tls_available"], true);
        assert!(!v.contains_key("tls_required"));
    }

    #[test]
    fn bad_info_is_an_error() {
        assert_eq!(rw().apply(b"nope"), Err(InfoError::NotJson));
        assert_eq!(rw().apply(b"{}"), Err(InfoError::MaxPayload));
        assert_eq!(
            rw().apply(br#"{"max_payload":48}"#),
            Err(InfoError::TooSmall(48))
        );
    }

    #[test]
    fn connect_headers_as_the_server_reads_it() {
        for (json, want) in [
            (&br#"{"headers":true,"protocol":1}"#[..], Some(true)),
            (br#"{"headers":true}"#, Some(true)),
            (br#"{"Headers":true,"verbose":false}"#, Some(true)),
            (br#"{"headers":true,"Headers":false}"#, Some(false)),
            (br#"{"headers":false,"protocol":1}"#, Some(false)),
            (br#"{"protocol":1}"#, None),
            (br#"{"headers":"yes"}"#, None),
            (
                b"{\"pr\xfftocol\":1,\"name\":\"\xfe\",\"headers\":true}",
                Some(true),
            ),
            (b"{not json", None),
            (b"[]", None),
        ] {
            assert_eq!(
                connect_headers(json),
                want,
                "{}",
                String::from_utf8_lossy(json)
            );
        }
    }
}
