//! Logging setup, once per process: an `EnvFilter` (`RUST_LOG` wins over `log.level`), pretty
//! output on a terminal and JSON otherwise (or as `log.format` says).

use std::io::IsTerminal as _;

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Call it from `main` only; tests use [`init_for_tests`].
pub fn init(log: &LogSettings) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|spec| !spec.trim().is_empty())
        .unwrap_or_else(|| log.level.clone());
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    if !spec.contains("sqlx") {
        // sqlx warns, once per request, of a pooled connection found broken when it is given
        // back (the database went away): kit's outage log says that once per outage. Shown
        // when a filter names sqlx.
        if let Ok(quiet) = "sqlx_core::pool::connection=error".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(json_layer(std::io::stderr)).try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    if result.is_err() {
        tracing::debug!("a tracing subscriber was already installed");
    }
}

/// Quiet unless `TEST_LOG` is set (then as `RUST_LOG`, default `debug`).
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// The JSON log layer: one JSON object per line, with the fields of the spans the event is in
/// (`span`, `spans`), their fields written by [`SpanJson`].
pub fn json_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'writer> MakeWriter<'writer> + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .fmt_fields(SpanJson)
        .with_writer(writer)
}

/// A span's fields as one JSON object, written straight into the span's buffer when the span
/// is made. Every request opens a span (its method, path, request id and trace id), so this
/// runs on every request of every service at the default level; tracing-subscriber's own
/// `JsonFields` builds a map of `serde_json::Value`s and serializes it, which callgrind showed
/// as a third of a cached GET's instructions at `info`. The JSON event format reads the object
/// back when an event in the span is written (rarely, for a request).
pub struct SpanJson;

impl<'writer> FormatFields<'writer> for SpanJson {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut object = JsonObject::new(&mut writer, true);
        fields.record(&mut object);
        object.close()
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        // `{...}` reopened: its closing brace goes, the new fields follow.
        let fresh = !current.fields.ends_with('}') || current.fields == "{}";
        if fresh {
            current.fields.clear();
        } else {
            current.fields.pop();
        }
        let mut writer = current.as_writer();
        let mut object = JsonObject::new(&mut writer, fresh);
        fields.record(&mut object);
        object.close()
    }
}

/// Writes the fields it visits as members of a JSON object.
struct JsonObject<'a, 'w> {
    out: &'a mut Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl<'a, 'w> JsonObject<'a, 'w> {
    /// `first`: no member written yet (the `{` is still to come).
    fn new(out: &'a mut Writer<'w>, first: bool) -> Self {
        Self {
            out,
            first,
            result: Ok(()),
        }
    }

    /// Starts the member `name` (the separator, the key and the colon).
    fn key(&mut self, name: &str) -> std::fmt::Result {
        self.out.write_char(if self.first { '{' } else { ',' })?;
        self.first = false;
        write_json_str(self.out, name)?;
        self.out.write_char(':')
    }

    fn member(&mut self, name: &str, value: impl FnOnce(&mut Writer<'w>) -> std::fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(name).and_then(|()| value(self.out));
        }
    }

    fn close(self) -> std::fmt::Result {
        self.result?;
        self.out.write_str(if self.first { "{}" } else { "}" })
    }
}

impl Visit for JsonObject<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field.name(), |out| write_json_str(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field.name(), |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                // JSON has no NaN or infinity.
                write!(out, "\"{value}\"")
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.member(field.name(), |out| {
            out.write_char('"')?;
            write!(JsonEscaped(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `value` as a JSON string, quotes included.
fn write_json_str(out: &mut impl std::fmt::Write, value: &str) -> std::fmt::Result {
    out.write_char('"')?;
    JsonEscaped(&mut *out).write_str(value)?;
    out.write_char('"')
}

/// Escapes what it is given as the inside of a JSON string (RFC 8259 section 7).
struct JsonEscaped<W>(W);

impl<W: std::fmt::Write> std::fmt::Write for JsonEscaped<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Byte by byte: every character to escape is ASCII, and no byte of a longer UTF-8
        // sequence is, so the text between them is cut at character boundaries.
        let mut plain = 0;
        for (i, &byte) in s.as_bytes().iter().enumerate() {
            let escaped = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                byte if byte < 0x20 => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escaped.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escaped)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log line in a request's spans carries their fields, whatever their types and however
    /// awkward their text (quotes, backslashes, newlines, control characters, non-ASCII), and
    /// the fields a span records later; every line is valid JSON.
    #[test]
    fn json_lines_carry_the_fields_of_their_spans() {
        let lines = crate::testing::CaptureWriter::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry().with(json_layer(move || writer.clone()));
        let awkward = "a \"quoted\" \\ path\nwith\ttabs \u{1} and ünïcode ✓";
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!(
                "request",
                method = %"GET",
                path = %awkward,
                request_id = "req-1",
                count = 3_u64,
                delta = -2_i64,
                ok = true,
                ratio = 0.5_f64,
                odd = f64::NAN,
                later = tracing::field::Empty,
            );
            let _outer = outer.enter();
            outer.record("later", "recorded");
            let inner = tracing::info_span!("handler", id = 7, debug = ?Some("x"));
            let _inner = inner.enter();
            let bare = tracing::info_span!("bare");
            let _bare = bare.enter();
            tracing::warn!(detail = "in the spans", "something happened");
        });
        let text = lines.text();
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        let spans = line["spans"].as_array().expect("spans");
        assert_eq!(spans.len(), 3, "{line}");
        let request = &spans[0];
        assert_eq!(request["name"], "request");
        assert_eq!(request["method"], "GET");
        assert_eq!(request["path"], awkward, "{line}");
        assert_eq!(request["request_id"], "req-1");
        assert_eq!(request["count"], 3);
        assert_eq!(request["delta"], -2);
        assert_eq!(request["ok"], true);
        assert_eq!(request["ratio"], 0.5);
        assert_eq!(request["odd"], "NaN");
        assert_eq!(request["later"], "recorded", "{line}");
        assert_eq!(spans[1]["id"], 7);
        assert_eq!(spans[1]["debug"], "Some(\"x\")");
        assert_eq!(spans[2]["name"], "bare");
        assert_eq!(line["span"]["name"], "bare");
        assert_eq!(line["fields"]["message"], "something happened");
        assert_eq!(line["fields"]["detail"], "in the spans");
    }
}
