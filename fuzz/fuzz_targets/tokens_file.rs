//! The tokens file parser on arbitrary text, and the permission checks on
//! what it accepts: a bad file is an error with a line number, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicast::auth::{Action, Pattern, TokenTable};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match TokenTable::parse(&text) {
        Ok(table) => {
            if let Some(client) = table.authenticate("token") {
                let _ = client.allows_topic(Action::Publish, "cache.x");
            }
        }
        Err(error) => assert!(error.line >= 1, "{error}"),
    }
    for line in text.lines().take(4) {
        let pattern = Pattern::parse(line);
        assert!(pattern.covers(&pattern), "a pattern covers itself: {pattern}");
        assert!(
            pattern.overlaps(&pattern),
            "a pattern shares its topics with itself: {pattern}"
        );
    }
});
