//! Topic patterns in permissions: the syntax of Subscribe filters (an exact
//! topic, `prefix*`, or `*`), and the two questions a permission check asks
//! of them: does one pattern cover every topic of another, and do two
//! patterns share any topic.

/// One topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Exactly this topic.
    Exact(String),
    /// Every topic that starts with this text (`cache.*` is `Prefix("cache.")`).
    Prefix(String),
    /// Every topic.
    All,
}

impl Pattern {
    /// Reads a pattern in Subscribe's filter syntax (validated by the caller).
    pub fn parse(text: &str) -> Self {
        match text.strip_suffix('*') {
            Some("") => Self::All,
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(text.to_owned()),
        }
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == topic,
            Self::Prefix(prefix) => topic.starts_with(prefix.as_str()),
            Self::All => true,
        }
    }

    /// Whether every topic `other` matches, this one matches too.
    pub fn covers(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Self::All, _) => true,
            (_, Self::All) => false,
            (_, Self::Exact(topic)) => self.matches(topic),
            (Self::Prefix(mine), Self::Prefix(theirs)) => theirs.starts_with(mine.as_str()),
            (Self::Exact(_), Self::Prefix(_)) => false,
        }
    }

    /// Whether some topic matches both.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Self::All, _) | (_, Self::All) => true,
            (Self::Exact(topic), pattern) | (pattern, Self::Exact(topic)) => pattern.matches(topic),
            (Self::Prefix(a), Self::Prefix(b)) => a.starts_with(b.as_str()) || b.starts_with(a.as_str()),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(topic) => f.write_str(topic),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
            Self::All => f.write_str("*"),
        }
    }
}

/// What one client may do with topics for one action: allowed patterns and
/// denied ones. Deny wins over allow; nothing is allowed unless listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub allow: Vec<Pattern>,
    pub deny: Vec<Pattern>,
}

impl Rules {
    /// Whether a message on `topic` is allowed.
    pub fn allows_topic(&self, topic: &str) -> bool {
        self.allow.iter().any(|p| p.matches(topic)) && !self.deny.iter().any(|p| p.matches(topic))
    }

    /// Whether every topic `filter` may match is allowed: one allowed
    /// pattern covers the whole filter, and no denied pattern shares a topic
    /// with it.
    pub fn allows_filter(&self, filter: &Pattern) -> bool {
        self.allow.iter().any(|p| p.covers(filter)) && !self.deny.iter().any(|p| p.overlaps(filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        Pattern::parse(text)
    }

    fn rules(allow: &[&str], deny: &[&str]) -> Rules {
        Rules {
            allow: allow.iter().map(|t| p(t)).collect(),
            deny: deny.iter().map(|t| p(t)).collect(),
        }
    }

    #[test]
    fn parse_and_display_round_trip() {
        for text in ["orders", "cache.*", "*"] {
            assert_eq!(p(text).to_string(), text);
        }
        assert_eq!(p("cache.*"), Pattern::Prefix("cache.".into()));
    }

    #[test]
    fn covers() {
        let cases = [
            ("*", "anything", true),
            ("*", "cache.*", true),
            ("cache.*", "cache.user", true),
            ("cache.*", "cache.user.*", true),
            ("cache.*", "cache.*", true),
            ("cache.*", "cac*", false),
            ("cache.*", "*", false),
            ("cache.*", "orders", false),
            ("orders", "orders", true),
            ("orders", "orders*", false),
            ("orders", "*", false),
        ];
        for (outer, inner, expected) in cases {
            assert_eq!(p(outer).covers(&p(inner)), expected, "{outer} covers {inner}");
        }
    }

    #[test]
    fn overlaps() {
        let cases = [
            ("*", "orders", true),
            ("cache.*", "cache.user", true),
            ("cache.*", "cac*", true),
            ("cac*", "cache.*", true),
            ("cache.*", "orders.*", false),
            ("cache.secret", "cache.*", true),
            ("cache.secret", "cache.public", false),
            ("orders", "orders", true),
        ];
        for (a, b, expected) in cases {
            assert_eq!(p(a).overlaps(&p(b)), expected, "{a} overlaps {b}");
            assert_eq!(p(b).overlaps(&p(a)), expected, "{b} overlaps {a}");
        }
    }

    #[test]
    fn deny_wins_and_nothing_is_allowed_unless_listed() {
        let r = rules(&["cache.*", "orders"], &["cache.secret*"]);
        assert!(r.allows_topic("cache.user"));
        assert!(r.allows_topic("orders"));
        assert!(!r.allows_topic("cache.secret.keys"), "denied");
        assert!(!r.allows_topic("users"), "not listed");
        assert!(
            !Rules::default().allows_topic("orders"),
            "an empty rule set allows nothing"
        );
        assert!(r.allows_filter(&p("cache.user.*")));
        assert!(
            !r.allows_filter(&p("cache.*")),
            "cache.* would include the denied cache.secret topics"
        );
        assert!(!r.allows_filter(&p("*")));
        assert!(r.allows_filter(&p("orders")));
    }
}
