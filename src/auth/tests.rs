use super::*;

fn line(client: &str, token: &str, permissions: &str) -> String {
    let base = digest_line(client, token);
    let (head, _) = base.split_once(" publish=").unwrap();
    format!("{head} {permissions}\n")
}

fn table(text: &str) -> TokenTable {
    TokenTable::parse(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn a_token_finds_its_client_and_its_permissions() {
    let text = format!(
        "# comment line\n\n{}{}",
        line(
            "billing",
            "s3cret-1",
            "publish=invoice.*,user.logout subscribe=invoice.*,!invoice.internal"
        ),
        line("cache", "s3cret-2", "subscribe=* # trailing comment"),
    );
    let t = table(&text);
    assert_eq!(t.len(), 2);
    let billing = t.authenticate("s3cret-1").expect("billing's token");
    assert_eq!(&*billing.name, "billing");
    assert!(billing.allows_topic(Action::Publish, "invoice.paid"));
    assert!(billing.allows_topic(Action::Publish, "user.logout"));
    assert!(!billing.allows_topic(Action::Publish, "user.login"));
    assert!(billing.allows_topic(Action::Subscribe, "invoice.paid"));
    assert!(
        !billing.allows_topic(Action::Subscribe, "invoice.internal"),
        "deny wins"
    );
    let cache = t.authenticate("s3cret-2").expect("cache's token");
    assert!(cache.allows_filter(&Pattern::All));
    assert!(
        !cache.allows_topic(Action::Publish, "anything"),
        "no publish= means none"
    );
    assert!(t.authenticate("s3cret-3").is_none());
    assert!(t.authenticate("").is_none());
    assert_eq!(
        t.client("cache").map(|c| c.name.to_string()),
        Some("cache".into())
    );
}

#[test]
fn digest_line_is_what_the_file_takes() {
    let line = digest_line("app", "hello");
    // SHA-256("hello")
    assert_eq!(
        line,
        "app sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 publish= subscribe="
    );
    assert!(table(&line).authenticate("hello").is_some());
}

#[test]
fn a_bad_file_names_the_line_and_what_is_wrong() {
    let good = line("a", "t1", "publish=x");
    let cases = [
        ("a sha256:abc publish=x", "is not sha256:<64 hex digits>"),
        ("a", "has no token digest"),
        ("a/b sha256:00", "must be 1 to 64 of"),
        (&*format!("{} bogus", good.trim()), "is not publish=<patterns>"),
        (
            &*format!("{} admin=*", good.trim()),
            "unknown permission \"admin\"",
        ),
        (
            &*format!("{} publish=ca*che", good.trim()),
            "'*' is only allowed at the end",
        ),
    ];
    for (text, words) in cases {
        let error = TokenTable::parse(&format!("# header\n{text}\n")).unwrap_err();
        assert_eq!(error.line, 2, "{text}");
        assert!(error.to_string().contains(words), "{words:?} in {error}");
    }
    let twice = format!("{good}{}", line("a", "t2", ""));
    assert!(
        TokenTable::parse(&twice)
            .unwrap_err()
            .reason
            .contains("listed twice")
    );
    let shared = format!("{good}{}", line("b", "t1", ""));
    assert!(
        TokenTable::parse(&shared)
            .unwrap_err()
            .reason
            .contains("same token")
    );
}

#[test]
fn bearer_metadata_is_read_strictly() {
    let mut metadata = tonic::metadata::MetadataMap::new();
    assert_eq!(bearer_token(&metadata), Err(AuthError::Missing));
    for bad in ["s3cret", "Basic s3cret", "Bearer ", "Bearer"] {
        metadata.insert("authorization", bad.parse().unwrap());
        assert_eq!(bearer_token(&metadata), Err(AuthError::Malformed), "{bad:?}");
    }
    metadata.insert("authorization", "Bearer s3cret".parse().unwrap());
    assert_eq!(bearer_token(&metadata), Ok("s3cret"));
    metadata.insert("authorization", "bearer s3cret".parse().unwrap());
    assert_eq!(bearer_token(&metadata), Ok("s3cret"));
}

#[test]
fn tokens_off_lets_everyone_in() {
    let metadata = tonic::metadata::MetadataMap::new();
    assert_eq!(Tokens::off().authenticate(&metadata), Ok(None));
    let (_tx, rx) = watch::channel(Arc::new(table(&line("a", "t", ""))));
    assert_eq!(
        Tokens::from_watch(rx).authenticate(&metadata),
        Err(AuthError::Missing)
    );
}

#[test]
fn the_example_tokens_file_parses_and_means_what_it_says() {
    let t = table(include_str!("../../examples/tokens.txt"));
    let web = t.authenticate("web-token-change-me").expect("web");
    assert!(web.allows_topic(Action::Publish, "cache.users"));
    assert!(web.allows_filter(&Pattern::parse("user.logout")));
    assert!(
        !web.allows_filter(&Pattern::parse("user.*")),
        "user.internal.* is denied"
    );
    let ops = t.authenticate("ops-token-change-me").expect("ops");
    assert!(ops.allows_filter(&Pattern::All));
    assert!(!ops.allows_topic(Action::Publish, "cache.users"));
    assert!(t.authenticate("billing-token-change-me").is_some());
}
