//! W3C Trace Context (`traceparent`, <https://www.w3.org/TR/trace-context/>) on every hop.
//!
//! Every service's standard layers ([`crate::http::with_standard_layers`]) read the incoming
//! `traceparent` (or start a trace when it is absent or invalid), put the trace id in the request
//! span (so every log line of the request carries it), and keep the context for the request's
//! task; the gateway and [`crate::client::ServiceClient`] send [`TraceContext::child`] of it on
//! the calls they make, so one trace id follows a request gateway → service → service, and each
//! hop names its own span as the parent of the next.

use axum::http::HeaderValue;
use axum::http::header::HeaderName;

/// The header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// One hop's trace context: the trace it belongs to, the span that sent it, and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The span of the caller (the parent of the receiver's span).
    pub parent_id: [u8; 8],
    pub flags: u8,
}

tokio::task_local! {
    /// The context of the request this task serves (set by [`layer`]).
    static CURRENT: TraceContext;
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    loop {
        let random = uuid::Uuid::new_v4().into_bytes();
        out.copy_from_slice(&random[..N]);
        // All zeros is invalid in both fields.
        if out.iter().any(|b| *b != 0) {
            return out;
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lower-case hex into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[i * 2] = HEX[usize::from(b >> 4)];
        out[i * 2 + 1] = HEX[usize::from(b & 0x0f)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    // Lower-case only, as the spec asks; on every request of every hop, so no `from_str_radix`.
    fn nibble(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

impl TraceContext {
    /// A new trace (sampled), as the first hop starts it.
    pub fn generate() -> Self {
        Self {
            trace_id: random_bytes(),
            parent_id: random_bytes(),
            flags: 0x01,
        }
    }

    /// Parses a `traceparent` value; `None` for anything the spec says to ignore (another
    /// length for version 00, upper-case hex, all-zero ids, version ff).
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace_id = unhex::<16>(parts.next()?)?;
        let parent_id = unhex::<8>(parts.next()?)?;
        let flags = unhex::<1>(parts.next()?)?[0];
        let version = unhex::<1>(version)?[0];
        // Version 00 has exactly four fields; later versions may add some.
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        if trace_id.iter().all(|b| *b == 0) || parent_id.iter().all(|b| *b == 0) {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The same trace, with a new span of this hop as the parent of the next.
    pub fn child(&self) -> Self {
        Self {
            parent_id: random_bytes(),
            ..*self
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The trace id as 32 hex digits, written into `buf` (no allocation: every request's span
    /// names it).
    pub fn trace_id_hex_in<'b>(&self, buf: &'b mut [u8; 32]) -> &'b str {
        hex_into(&self.trace_id, buf);
        std::str::from_utf8(buf).expect("hex digits are ASCII")
    }

    /// The `traceparent` value (version 00).
    pub fn header_value(&self) -> HeaderValue {
        // 00-<32 hex>-<16 hex>-<2 hex>, written in place (it is on every request of every hop).
        let mut text = [b'-'; 55];
        text[..2].copy_from_slice(b"00");
        hex_into(&self.trace_id, &mut text[3..35]);
        hex_into(&self.parent_id, &mut text[36..52]);
        hex_into(&[self.flags], &mut text[53..55]);
        HeaderValue::from_bytes(&text).expect("hex and dashes are a valid header value")
    }

    /// The context of the request the current task serves, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|ctx| *ctx).ok()
    }

    /// The request's context: its valid `traceparent`, or a new trace.
    pub fn of_request(headers: &axum::http::HeaderMap) -> Self {
        headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
            .unwrap_or_else(Self::generate)
    }
}

/// `fut` (the rest of a request), run with `ctx` as [`TraceContext::current`]. A named future,
/// so the standard middleware holds it without a box.
pub fn scope<F: std::future::Future>(
    ctx: TraceContext,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<TraceContext, F> {
    CURRENT.scope(ctx, fut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_round_trips_and_its_child_keeps_the_trace() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(text).expect("valid");
        assert_eq!(ctx.header_value(), text);
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.parent_id, ctx.parent_id);
        assert_eq!(child.flags, 1);
        let generated = TraceContext::generate();
        let parsed = TraceContext::parse(generated.header_value().to_str().expect("text"));
        assert_eq!(parsed, Some(generated));
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47+6-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some(),
            "a later version may carry more fields"
        );
    }
}
