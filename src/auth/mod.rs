//! Client tokens with topic permissions (`--tokens-file`).
//!
//! A client sends `authorization: Bearer <token>`. The tokens file holds, per
//! named client, the SHA-256 of its token and the topic patterns it may
//! publish to and subscribe to, one client per line:
//!
//! ```text
//! # client   token digest        permissions (comma-separated patterns; "!" denies)
//! billing    sha256:9f86d081...  publish=invoice.*,user.logout  subscribe=invoice.*
//! ```
//!
//! Patterns use Subscribe's filter syntax (`orders`, `cache.*`, `*`); deny
//! wins over allow and nothing is allowed unless listed. Tokens are compared
//! by their digest, in constant time, and never logged. The file is re-read
//! when it changes, all or nothing: a file that does not parse keeps the
//! previous table and the log says why. `replicast token hash` prints the
//! line for a new token.

mod pattern;
mod reload;

use std::{fmt, sync::Arc};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

pub use self::{
    pattern::{Pattern, Rules},
    reload::{TokensLoadError, TokensSource, spawn_tokens_reload},
};
use crate::validate;

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Publish => "publish to",
            Self::Subscribe => "subscribe to",
        })
    }
}

/// One client of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub name: Arc<str>,
    digest: [u8; 32],
    pub publish: Rules,
    pub subscribe: Rules,
}

impl Client {
    fn rules(&self, action: Action) -> &Rules {
        match action {
            Action::Publish => &self.publish,
            Action::Subscribe => &self.subscribe,
        }
    }

    /// Whether this client may publish to / receive `topic`.
    pub fn allows_topic(&self, action: Action, topic: &str) -> bool {
        self.rules(action).allows_topic(topic)
    }

    /// Whether this client may subscribe with `filter` (every topic it may
    /// match must be allowed).
    pub fn allows_filter(&self, filter: &Pattern) -> bool {
        self.subscribe.allows_filter(filter)
    }
}

/// The parsed tokens file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTable {
    clients: Vec<Arc<Client>>,
}

/// Why a tokens file was not taken, with the line it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct TokensError {
    pub line: usize,
    pub reason: String,
}

/// Why a call was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send the metadata `authorization: Bearer <token>`")]
    Missing,
    #[error("malformed credentials: the `authorization` metadata must be `Bearer <token>`")]
    Malformed,
    #[error("unknown token: it is not in this replica's tokens file")]
    Unknown,
}

impl TokenTable {
    /// Parses a tokens file (see the module documentation).
    pub fn parse(text: &str) -> Result<Self, TokensError> {
        let mut clients: Vec<Arc<Client>> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let err = |reason: String| TokensError { line, reason };
            let mut fields = content.split_whitespace();
            let name = fields.next().unwrap_or_default();
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                || name.len() > 64
            {
                return Err(err(format!(
                    "client name {name:?} must be 1 to 64 of [A-Za-z0-9._-]"
                )));
            }
            let digest = fields.next().ok_or_else(|| {
                err(format!(
                    "client {name} has no token digest (sha256:<64 hex digits>)"
                ))
            })?;
            let digest = parse_digest(digest).ok_or_else(|| {
                err(format!(
                    "client {name}: {digest:?} is not sha256:<64 hex digits> (replicast token hash prints it)"
                ))
            })?;
            let mut client = Client {
                name: name.into(),
                digest,
                publish: Rules::default(),
                subscribe: Rules::default(),
            };
            for field in fields {
                let (key, value) = field.split_once('=').ok_or_else(|| {
                    err(format!(
                        "{field:?} is not publish=<patterns> or subscribe=<patterns>"
                    ))
                })?;
                let rules = match key {
                    "publish" => &mut client.publish,
                    "subscribe" => &mut client.subscribe,
                    other => {
                        return Err(err(format!(
                            "unknown permission {other:?}: only publish= and subscribe= exist"
                        )));
                    }
                };
                for pattern in value.split(',').filter(|p| !p.is_empty()) {
                    let (deny, text) = match pattern.strip_prefix('!') {
                        Some(text) => (true, text),
                        None => (false, pattern),
                    };
                    validate::topic_filter(text).map_err(|e| err(format!("client {name}: {e}")))?;
                    let parsed = Pattern::parse(text);
                    if deny {
                        rules.deny.push(parsed);
                    } else {
                        rules.allow.push(parsed);
                    }
                }
            }
            if clients.iter().any(|c| *c.name == *name) {
                return Err(err(format!("client {name} is listed twice")));
            }
            if clients.iter().any(|c| c.digest == client.digest) {
                return Err(err(format!(
                    "client {name} has the same token as another client; give each client its own"
                )));
            }
            clients.push(Arc::new(client));
        }
        Ok(Self { clients })
    }

    /// The client whose token this is. Every entry is compared, in constant
    /// time, whichever matches: how long it takes says nothing about the
    /// token.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Client>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for client in &self.clients {
            if bool::from(client.digest.ct_eq(&digest)) {
                found = Some(client.clone());
            }
        }
        found
    }

    /// The client called `name`, as this table has it (after a reload).
    pub fn client(&self, name: &str) -> Option<Arc<Client>> {
        self.clients.iter().find(|c| *c.name == *name).cloned()
    }

    /// `client` as this (newer) table has it: the same name with the same
    /// token, its permissions as they are now. `None` once its token is gone
    /// or replaced.
    pub fn still_valid(&self, client: &Client) -> Option<Arc<Client>> {
        self.client(&client.name)
            .filter(|current| bool::from(current.digest.ct_eq(&client.digest)))
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// The line of the tokens file for a new token (no permissions yet).
pub fn digest_line(client: &str, token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{client} sha256:{hex} publish= subscribe=")
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// The token of a call's `authorization` metadata.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token.trim())
}

/// The tokens in force: `None` when `--tokens-file` is not set (every
/// client may do everything).
#[derive(Debug, Clone, Default)]
pub struct Tokens(Option<watch::Receiver<Arc<TokenTable>>>);

impl Tokens {
    /// No tokens: authentication is off.
    pub fn off() -> Self {
        Self(None)
    }

    pub fn from_watch(rx: watch::Receiver<Arc<TokenTable>>) -> Self {
        Self(Some(rx))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The calling client (`None` with authentication off).
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<Arc<Client>>, AuthError> {
        let Some(rx) = &self.0 else {
            return Ok(None);
        };
        let token = bearer_token(metadata)?;
        let table = rx.borrow().clone();
        table.authenticate(token).map(Some).ok_or(AuthError::Unknown)
    }

    /// A receiver of every new table (`None` with authentication off), for
    /// streams that re-check their client when the file changes.
    pub fn watch(&self) -> Option<watch::Receiver<Arc<TokenTable>>> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests;
