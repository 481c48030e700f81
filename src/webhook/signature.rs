//! Standard Webhooks signatures (https://www.standardwebhooks.com):
//! `webhook-id` (the message id, the same on every retry, so the app can
//! deduplicate), `webhook-timestamp` (Unix seconds of the attempt) and
//! `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
//! one per secret, space-separated, so a secret can be rotated: add the new
//! one to the file, restart the replica (the file is read at start-up),
//! move the app over, then remove the old one (and restart again).

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The signing secrets of one webhook.
#[derive(Clone)]
pub struct Secrets(Vec<Vec<u8>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} secrets)", self.0.len())
    }
}

/// A secrets file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    #[error("line {line}: not a secret: expected whsec_<base64> (24 to 64 random bytes)")]
    Malformed { line: usize },
    #[error("no secret in the file (one whsec_<base64> per line)")]
    Empty,
}

impl Secrets {
    /// One `whsec_<base64>` per line; blank lines and `#` comments skipped.
    pub fn parse(text: &str) -> Result<Self, SecretsError> {
        let mut secrets = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = line
                .strip_prefix("whsec_")
                .and_then(|b64| STANDARD.decode(b64).ok())
                .filter(|key| (24..=64).contains(&key.len()))
                .ok_or(SecretsError::Malformed { line: i + 1 })?;
            secrets.push(key);
        }
        if secrets.is_empty() {
            return Err(SecretsError::Empty);
        }
        Ok(Self(secrets))
    }

    /// The `webhook-signature` value for one attempt.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let signatures: Vec<String> = self
            .0
            .iter()
            .map(|key| {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
            })
            .collect();
        signatures.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_reference_does() {
        // The example of the Standard Webhooks specification's test vectors.
        let secrets = Secrets::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secrets.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn several_secrets_sign_once_each_and_bad_lines_are_named() {
        let text =
            "# old\nwhsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n\nwhsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n";
        let signature = Secrets::parse(text).unwrap().sign("id", 1, b"x");
        assert_eq!(signature.split(' ').count(), 2);
        assert_eq!(
            Secrets::parse("whsec_short\n").unwrap_err(),
            SecretsError::Malformed { line: 1 }
        );
        assert_eq!(Secrets::parse("# nothing\n").unwrap_err(), SecretsError::Empty);
    }
}
