//! What the tests deliver to: a minimal SMTP server (enough of RFC 5321 for a client that sends
//! plain-text mail without TLS: greeting, EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) that
//! keeps every message, and a webhook receiver that checks each request's signature and can be
//! told to fail.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// The DATA as sent (headers, blank line, body), dot-stuffing undone.
    pub data: String,
}

impl Mail {
    /// A header's value (the first of that name).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or("");
        head.split("\r\n").find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    pub fn body(&self) -> String {
        self.data
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.replace("\r\n", "\n"))
            .unwrap_or_default()
    }
}

/// A local SMTP sink on 127.0.0.1; stops when dropped.
pub struct SmtpSink {
    pub port: u16,
    pub mails: Arc<Mutex<Vec<Mail>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind smtp");
        let port = listener.local_addr().expect("addr").port();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let store = mails.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let _ = session(stream, store).await;
                });
            }
        });
        Self { port, mails, task }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().expect("lock").clone()
    }

    /// Waits (bounded) until `n` messages arrived; returns them.
    pub async fn until(&self, n: usize) -> Vec<Mail> {
        until(|| {
            let mails = self.mails();
            (mails.len() >= n).then_some(mails)
        })
        .await
        .unwrap_or_else(|| panic!("{n} mails did not arrive: {:?}", self.mails()))
    }
}

async fn session(
    stream: tokio::net::TcpStream,
    store: Arc<Mutex<Vec<Mail>>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 sink ESMTP ready\r\n").await?;
    let (mut from, mut to) = (String::new(), Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-sink greets you\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
        } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
            b"250 OK\r\n"
        } else if upper.starts_with("RSET") {
            from.clear();
            to.clear();
            b"250 OK\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = address(&command["MAIL FROM:".len()..]);
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            to.push(address(&command["RCPT TO:".len()..]));
            b"250 OK\r\n"
        } else if upper == "DATA" {
            write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
            let mut data = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" {
                    break;
                }
                let unstuffed = line.strip_prefix('.').unwrap_or(&line);
                data.push_str(unstuffed);
            }
            store.lock().expect("lock").push(Mail {
                from: std::mem::take(&mut from),
                to: std::mem::take(&mut to),
                data,
            });
            b"250 queued\r\n"
        } else if upper.starts_with("QUIT") {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}

fn address(arg: &str) -> String {
    let arg = arg.trim();
    let inner = arg
        .strip_prefix('<')
        .and_then(|a| a.split_once('>'))
        .map_or(arg, |(a, _)| a);
    inner.to_owned()
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hook {
    pub at: Instant,
    pub event_type: String,
    pub delivery: String,
    /// The signature matched the body and timestamp under the receiver's secret.
    pub verified: bool,
    pub body: serde_json::Value,
    /// What the receiver answered.
    pub status: u16,
}

#[derive(Clone)]
struct Receiver {
    secret: String,
    /// Milliseconds to wait before answering.
    delay: Arc<std::sync::atomic::AtomicU64>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    hooks: Arc<Mutex<Vec<Hook>>>,
}

/// A webhook endpoint on 127.0.0.1; stops when dropped.
pub struct WebhookReceiver {
    pub url: String,
    delay: Arc<std::sync::atomic::AtomicU64>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    hooks: Arc<Mutex<Vec<Hook>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The receiver's own check, written from the documented scheme (not the service's code):
/// `x-agora-signature: v1=<hex HMAC-SHA256(secret, "<x-agora-timestamp>.<raw body>")>`.
pub fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    use hmac::Mac as _;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(timestamp), Some(signature)) =
        (header("x-agora-timestamp"), header("x-agora-signature"))
    else {
        return false;
    };
    let Some(hex_sig) = signature.strip_prefix("v1=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() <= 300);
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    fresh && mac.verify_slice(&expected).is_ok()
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let delay = receiver.delay.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let failing = receiver.failing.load(std::sync::atomic::Ordering::SeqCst);
    let status = if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    receiver.hooks.lock().expect("lock").push(Hook {
        at: Instant::now(),
        event_type: header("x-agora-event"),
        delivery: header("x-agora-delivery"),
        verified: verify(&receiver.secret, &headers, &body),
        body: serde_json::from_slice(&body).unwrap_or_default(),
        status: status.as_u16(),
    });
    status
}

impl WebhookReceiver {
    pub async fn start(secret: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook");
        let url = format!(
            "http://{}/hooks/agora",
            listener.local_addr().expect("addr")
        );
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let delay = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let state = Receiver {
            secret: secret.to_owned(),
            delay: delay.clone(),
            failing: failing.clone(),
            hooks: hooks.clone(),
        };
        let app = axum::Router::new()
            .route("/hooks/agora", axum::routing::post(receive))
            .with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            delay,
            failing,
            hooks,
            task,
        }
    }

    /// Wait this long before answering from now on.
    pub fn delay(&self, delay: Duration) {
        self.delay.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Answer 500 (true) or 204 (false) from now on.
    pub fn fail(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().expect("lock").clone()
    }

    /// Waits (bounded) until `n` requests arrived; returns them.
    pub async fn until(&self, n: usize) -> Vec<Hook> {
        until(|| {
            let hooks = self.hooks();
            (hooks.len() >= n).then_some(hooks)
        })
        .await
        .unwrap_or_else(|| panic!("{n} webhook requests did not arrive: {:?}", self.hooks()))
    }
}

/// Polls `check` every 20 ms for at most 20 s.
pub async fn until<T>(mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
