//! W3C trace context: what a message causes carries its trace on.

use rand::Rng;

/// The W3C `traceparent` for what a message causes: the same trace id with a new parent id, or a
/// new trace when the message carried none (or an invalid one).
pub fn child_traceparent(incoming: Option<&str>) -> String {
    let span_id = format!("{:016x}", rand::rng().random::<u64>() | 1);
    if let Some(tp) = incoming {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        let valid = parts.len() >= 4
            && parts[0].len() == 2
            && parts[0] != "ff"
            && parts[1].len() == 32
            && parts[1].chars().all(|c| c.is_ascii_hexdigit())
            && parts[1] != "00000000000000000000000000000000"
            && parts[3].len() == 2;
        if valid {
            return format!(
                "00-{}-{span_id}-{}",
                parts[1].to_ascii_lowercase(),
                parts[3]
            );
        }
    }
    format!("00-{:032x}-{span_id}-01", rand::rng().random::<u128>() | 1)
}

#[cfg(test)]
mod tests {
    use super::child_traceparent;

    #[test]
    fn a_child_traceparent_keeps_the_trace_and_changes_the_parent() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = child_traceparent(Some(parent));
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
        assert_eq!(child.len(), parent.len());
    }

    #[test]
    fn a_missing_or_invalid_traceparent_starts_a_new_trace() {
        for input in [None, Some("garbage"), Some("00-0000-11-01")] {
            let tp = child_traceparent(input);
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts.len(), 4, "{tp}");
            assert_eq!(parts[1].len(), 32);
            assert_eq!(parts[2].len(), 16);
        }
    }
}
