//! `agora bench chat`: the chat service through the gateway of a running Agora. One chat with
//! `--subscribers` participants each holding a WebSocket (`/api/v1/chats/{id}/stream`), and
//! `--connections` clients posting messages back to back for `--seconds`: messages posted per
//! second, and post → WebSocket delivery latency (from just before the POST is sent to the frame
//! arriving at a subscriber) over every delivery to every subscriber.
//!
//! Loopback only, bounded in time, subscribers and connections; the gateway must be in `open`
//! auth mode (`agora up`'s default: subscribers name themselves with `participant_id`). The
//! chat is deleted at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, clap::Args)]
pub struct ChatBench {
    /// The gateway of the running system.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: url::Url,
    /// WebSocket subscribers of the chat.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Clients posting back to back.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long they post.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn loopback(host: Option<&str>) -> bool {
    matches!(host, Some("127.0.0.1" | "localhost" | "::1" | "[::1]"))
}

pub async fn chat(args: ChatBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        loopback(args.url.host_str()),
        "agora bench runs against loopback only (got {})",
        args.url
    );
    anyhow::ensure!(
        (1..=1000).contains(&args.subscribers),
        "--subscribers: 1 to 1000"
    );
    anyhow::ensure!(
        (1..=256).contains(&args.connections),
        "--connections: 1 to 256"
    );
    anyhow::ensure!((1..=300).contains(&args.seconds), "--seconds: 1 to 300");
    let base = args.url.as_str().trim_end_matches('/').to_owned();
    let ws_base = base.replacen("http", "ws", 1);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections.max(16))
        .timeout(Duration::from_secs(10))
        .build()?;
    println!(
        "agora bench chat: {base}, {} subscribers, {} posting connections, {} s",
        args.subscribers, args.connections, args.seconds
    );

    let response = client
        .post(format!("{base}/api/v1/chats"))
        .json(&json!({"name": "agora bench chat", "metadata": {"bench": true}}))
        .send()
        .await
        .context("creating the bench chat (is `agora up` running?)")?;
    anyhow::ensure!(
        response.status() == 201,
        "creating the bench chat: {} (the gateway must be in open mode)",
        response.status()
    );
    let chat: Value = response.json().await?;
    let id = chat["id"].as_str().context("chat id")?.to_owned();
    let mut ids: Vec<String> = (0..args.subscribers)
        .map(|i| format!("bench-{i}"))
        .collect();
    ids.push("bench-poster".into());
    for chunk in ids.chunks(100) {
        let response = client
            .post(format!("{base}/api/v1/chats/{id}/participants"))
            .json(&json!({ "participant_ids": chunk }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 200,
            "adding participants: {}",
            response.status()
        );
    }

    // Every subscriber records (posted-at offset, received-at offset) per message, in ns since
    // `origin`.
    let origin = Instant::now();
    let mut sockets = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let url = format!("{ws_base}/api/v1/chats/{id}/stream?participant_id=bench-{i}");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .with_context(|| format!("subscriber {i}"))?;
        sockets.push(socket);
    }
    let stop_listening = tokio_util::sync::CancellationToken::new();
    let listeners: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            let stop = stop_listening.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let frame = tokio::select! {
                        () = stop.cancelled() => break,
                        frame = socket.next() => frame,
                    };
                    let Some(Ok(Message::Text(text))) = frame else {
                        if matches!(frame, None | Some(Err(_)) | Some(Ok(Message::Close(_)))) {
                            break;
                        }
                        continue;
                    };
                    let received = origin.elapsed().as_nanos() as u64;
                    let Ok(event) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if event["type"] != "chat.message_posted" {
                        continue;
                    }
                    let sent = event["data"]["message"]["text"]
                        .as_str()
                        .and_then(|t| t.parse::<u64>().ok());
                    if let Some(sent) = sent {
                        latencies.push(Duration::from_nanos(received.saturating_sub(sent)));
                    }
                }
                let _ = socket.close(None).await;
                latencies
            })
        })
        .collect();

    let phase = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let url = Arc::new(format!("{base}/api/v1/chats/{id}/messages"));
    let posters: Vec<_> = (0..args.connections)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let (mut posted, mut failed) = (0_u64, 0_u64);
                while started.elapsed() < phase {
                    let sent = origin.elapsed().as_nanos().to_string();
                    let response = client
                        .post(url.as_str())
                        .json(&json!({"sender_id": "bench-poster", "text": sent}))
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status() == 201 => posted += 1,
                        _ => failed += 1,
                    }
                }
                (posted, failed)
            })
        })
        .collect();
    let (mut posted, mut failed) = (0, 0);
    for (p, f) in futures::future::join_all(posters)
        .await
        .into_iter()
        .flatten()
    {
        posted += p;
        failed += f;
    }
    let elapsed = started.elapsed();
    // Let the last deliveries arrive (bounded).
    let expected = posted * args.subscribers as u64;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_listening.cancel();
    let mut latencies = Vec::with_capacity(expected as usize);
    for l in futures::future::join_all(listeners)
        .await
        .into_iter()
        .flatten()
    {
        latencies.extend(l);
    }
    latencies.sort_unstable();
    let _ = client
        .delete(format!("{base}/api/v1/chats/{id}"))
        .send()
        .await;

    let quantile = |q: f64| {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    println!(
        "posted: {posted} messages in {:.1} s = {:.0} messages/s ({failed} failed)",
        elapsed.as_secs_f64(),
        posted as f64 / elapsed.as_secs_f64()
    );
    println!(
        "delivered: {} of {expected} frames to {} subscribers ({:.0} frames/s)",
        latencies.len(),
        args.subscribers,
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "post -> WebSocket latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        quantile(0.50),
        quantile(0.99),
        quantile(1.0)
    );
    Ok(())
}
