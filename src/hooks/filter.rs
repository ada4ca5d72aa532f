//! Which events a hook wants. Matching runs on the routing path, so it only
//! compares borrowed strings and never allocates.

use serde::{Deserialize, Serialize};

use super::event::{EventProps, HookEvent, HookEventKind};

/// Conditions an event must meet for a hook to run; every condition that is
/// set must hold, an unset one matches anything.
///
/// In `hooks.yaml` this is the `filter:` mapping of a hook entry, e.g.
/// `{kind: topic, topic_prefix: "md.", transport: zmq}`. Unknown keys are
/// rejected so that a typo cannot silently widen a filter.
///
/// What a hook may run for is also what the bus asks its sources for: a
/// hook that can run for topic events of the ZeroMQ transport (`kind`
/// unset or `topic`, `transport` unset or `zmq`, no `to`) makes the
/// bus's proxy subscribe its publishers to `topic_prefix`; **without a
/// `topic_prefix` it needs every topic**, so every publisher sends the
/// proxy everything. Give topic hooks a prefix.
///
/// The default filter ([`HookFilter::any`]) sets no condition; a key left
/// out of the mapping is a condition not set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HookFilter {
    /// Only events of this kind (`message` or `topic`).
    #[serde(alias = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<HookEventKind>,
    /// Only routed messages whose target endpoint is exactly this name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Only events whose topic starts with this prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
    /// Only traffic carried by this transport (`unix`, `zmq`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

impl HookFilter {
    /// The reference bus's filter: every routed `message`, from any
    /// transport, to any target. Hooks given as plain paths get this one.
    pub fn messages() -> HookFilter {
        HookFilter {
            kind: Some(HookEventKind::Message),
            ..HookFilter::any()
        }
    }

    /// A filter that matches every event: no condition set.
    pub fn any() -> HookFilter {
        HookFilter::default()
    }

    /// Whether an event with these properties passes the filter. Borrowed
    /// properties only, so callers can ask before building an event.
    pub fn matches(&self, event: &EventProps<'_>) -> bool {
        if let Some(want) = self.kind {
            if want != event.kind {
                return false;
            }
        }
        if let Some(want) = self.transport.as_deref() {
            if want != event.transport {
                return false;
            }
        }
        if let Some(want) = self.to.as_deref() {
            if event.to != Some(want) {
                return false;
            }
        }
        if let Some(prefix) = self.topic_prefix.as_deref() {
            match event.topic {
                Some(t) if t.starts_with(prefix) => {}
                _ => return false,
            }
        }
        true
    }

    /// The topic prefix this hook needs from `transport`'s topic events:
    /// None when it never runs for them, `Some("")` when it runs for
    /// every topic (no `topic_prefix`).
    pub fn topic_interest(&self, transport: &str) -> Option<&str> {
        if self.kind.is_some_and(|k| k != HookEventKind::Topic)
            || self.transport.as_deref().is_some_and(|t| t != transport)
            || self.to.is_some()
        {
            return None;
        }
        Some(self.topic_prefix.as_deref().unwrap_or(""))
    }

    /// Whether `event` passes the filter.
    pub fn matches_event(&self, event: &HookEvent) -> bool {
        self.matches(&event.props())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(yaml: &str) -> HookFilter {
        serde_yaml::from_str(yaml).expect("filter")
    }

    #[test]
    fn topic_interest_is_the_prefix_a_hook_can_run_for() {
        assert_eq!(HookFilter::messages().topic_interest("zmq"), None);
        assert_eq!(HookFilter::any().topic_interest("zmq"), Some(""));
        assert_eq!(filter("{kind: topic}").topic_interest("zmq"), Some(""));
        assert_eq!(
            filter("{kind: topic, topic_prefix: md/}").topic_interest("zmq"),
            Some("md/")
        );
        assert_eq!(
            filter("{topic_prefix: md/, transport: zmq}").topic_interest("zmq"),
            Some("md/")
        );
        assert_eq!(
            filter("{topic_prefix: md/, transport: unix}").topic_interest("zmq"),
            None
        );
        // Topic events have no `to`: such a hook never runs for them.
        assert_eq!(filter("{to: desk}").topic_interest("zmq"), None);
    }
}
