//! What AMQP and PostgreSQL can hold, and cutting text to fit.

/// Longest AMQP short string, in bytes.
pub const MAX_SHORT_STRING: usize = 255;
/// Largest body RabbitMQ 4.x accepts by default (`max_message_size`).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Longest `requestId` / `virtualKeyId`, in bytes. Both travel as AMQP short strings
/// (`correlation_id`, at most 255 bytes) and as PostgreSQL keys; 200 leaves room for prefixes.
pub const MAX_ID_BYTES: usize = 200;

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut with `…`: for
/// log lines, error texts and headers that quote what a sender put in a message.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
