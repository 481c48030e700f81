//! Keeps the tokens table current: the file is read at start-up (a file
//! that does not parse stops the replica from starting) and then looked at
//! every few seconds. Reading the path each time, not watching the file,
//! also follows a Kubernetes secret mount, which swaps a `..data` symlink.

use std::{path::PathBuf, sync::Arc, time::Duration};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{Instrument, info, warn};

use super::TokenTable;
use crate::{
    lifecycle::{Phase, PhaseRx},
    metrics::ReloadLabels,
};

/// The tokens file and how often it is looked at.
#[derive(Debug, Clone)]
pub struct TokensSource {
    pub path: PathBuf,
    pub interval: Duration,
}

/// Why the tokens file could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TokensLoadError {
    #[error("cannot read the tokens file {path} (--tokens-file): {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tokens file {path} (--tokens-file) is invalid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: super::TokensError,
    },
}

/// Loads the tokens file, then re-reads it until the replica stops.
pub async fn spawn_tokens_reload(
    source: TokensSource,
    reloads: Family<ReloadLabels, Counter>,
    phase: PhaseRx,
) -> Result<(watch::Receiver<Arc<TokenTable>>, JoinHandle<()>), TokensLoadError> {
    let text = tokio::fs::read_to_string(&source.path)
        .await
        .map_err(|e| TokensLoadError::Read {
            path: source.path.clone(),
            source: e,
        })?;
    let table = TokenTable::parse(&text).map_err(|e| TokensLoadError::Parse {
        path: source.path.clone(),
        source: e,
    })?;
    info!(path = %source.path.display(), clients = table.len(), "tokens loaded: Broadcast, Publish, Subscribe and ListPeers need a token");
    let (tx, rx) = watch::channel(Arc::new(table));
    let span = tracing::info_span!("tokens", path = %source.path.display());
    let task = tokio::spawn(
        async move {
            let mut last = text;
            let stopped = phase.reached(Phase::Closing);
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    () = &mut stopped => return,
                    () = tokio::time::sleep(source.interval) => {}
                }
                let text = match tokio::fs::read_to_string(&source.path).await {
                    Ok(text) => text,
                    Err(error) => {
                        if last_error_changed(&mut last, &error) {
                            warn!(%error, "cannot read the tokens file; keeping the previous tokens");
                            reloads
                                .get_or_create(&ReloadLabels { result: "unreadable" })
                                .inc();
                        }
                        continue;
                    }
                };
                if text == last {
                    continue;
                }
                match TokenTable::parse(&text) {
                    Ok(table) => {
                        info!(clients = table.len(), "tokens file changed; reloaded");
                        reloads.get_or_create(&ReloadLabels { result: "loaded" }).inc();
                        tx.send_replace(Arc::new(table));
                    }
                    Err(error) => {
                        warn!(%error, "tokens file changed but is invalid; keeping the previous tokens");
                        reloads.get_or_create(&ReloadLabels { result: "rejected" }).inc();
                    }
                }
                last = text;
            }
        }
        .instrument(span),
    );
    Ok((rx, task))
}

/// Remembers an unreadable file as "changed" so it is reported once, and
/// read again (and compared afresh) once it is back.
fn last_error_changed(last: &mut String, error: &std::io::Error) -> bool {
    let marker = format!("\u{0}unreadable: {}", error.kind());
    if *last == marker {
        return false;
    }
    *last = marker;
    true
}
