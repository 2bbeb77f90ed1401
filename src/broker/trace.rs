//! W3C trace context: what a message causes carries its trace on.
//!
//! The span that handles a message continues the message's trace ([`continue_trace`]), and what
//! it publishes carries that span's context ([`onward_traceparent`]): with span export on, one
//! trace per request across instances. Without the OpenTelemetry layer the onward context is a
//! fresh parent id in the same trace ([`child_traceparent`]), as before.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rand::Rng;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The remote span a W3C `traceparent` names, if it is a valid one.
pub fn remote_span(traceparent: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    if parts.len() < 4 || parts[0].len() != 2 || parts[0] == "ff" || parts[3].len() != 2 {
        return None;
    }
    if parts[1].len() != 32 || parts[2].len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(parts[1]).ok()?;
    let span_id = SpanId::from_hex(parts[2]).ok()?;
    let flags = u8::from_str_radix(parts[3], 16).ok()?;
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// Makes `span` (not yet entered) a child of the remote span `traceparent` names; without a
/// valid one the span starts a new trace. A no-op without the OpenTelemetry layer.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(remote) = traceparent.and_then(remote_span) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// The `traceparent` for what the current span causes: the current span itself when the
/// OpenTelemetry layer records it, else [`child_traceparent`] of `incoming`.
pub fn onward_traceparent(incoming: Option<&str>) -> String {
    let context = tracing::Span::current().context();
    let span = context.span();
    let current = span.span_context();
    if current.is_valid() {
        return format!(
            "00-{}-{}-{:02x}",
            current.trace_id(),
            current.span_id(),
            current.trace_flags().to_u8()
        );
    }
    child_traceparent(incoming)
}

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
    use super::{child_traceparent, remote_span};

    #[test]
    fn a_traceparent_names_its_remote_span() {
        let remote =
            remote_span("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(
            remote.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(remote.span_id().to_string(), "00f067aa0ba902b7");
        assert!(remote.is_sampled() && remote.is_remote());
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert!(remote_span(bad).is_none(), "{bad}");
        }
    }

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
