//! Subscribe topic filters: exact topics and `prefix*` patterns.

/// A validated set of topic patterns. Empty (and the default) matches everything.
#[derive(Debug, Clone)]
pub struct TopicFilter {
    exact: Vec<String>,
    prefixes: Vec<String>,
    all: bool,
}

impl Default for TopicFilter {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl TopicFilter {
    /// Builds a filter from Subscribe's `topics` (already validated).
    pub fn new(patterns: &[String]) -> Self {
        let mut filter = Self {
            exact: Vec::new(),
            prefixes: Vec::new(),
            all: patterns.is_empty(),
        };
        for pattern in patterns {
            match pattern.strip_suffix('*') {
                Some("") => filter.all = true,
                Some(prefix) => filter.prefixes.push(prefix.to_owned()),
                None => filter.exact.push(pattern.clone()),
            }
        }
        filter
    }

    /// Whether a message on `topic` passes the filter.
    pub fn matches(&self, topic: &str) -> bool {
        self.all
            || self.exact.iter().any(|t| t == topic)
            || self.prefixes.iter().any(|p| topic.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(patterns: &[&str]) -> TopicFilter {
        TopicFilter::new(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn empty_and_star_match_everything() {
        assert!(filter(&[]).matches("anything"));
        assert!(TopicFilter::default().matches("anything"));
        assert!(filter(&["*"]).matches("anything"));
    }

    #[test]
    fn exact_and_prefix() {
        let f = filter(&["orders", "cache.*"]);
        assert!(f.matches("orders"));
        assert!(!f.matches("orders.new"), "an exact topic is not a prefix");
        assert!(f.matches("cache.invalidate"));
        assert!(f.matches("cache."));
        assert!(!f.matches("cache"), "'cache.*' needs the dot");
        assert!(!f.matches("users"));
    }
}
