//! `ref-proxy`: one hop in front of an upstream (`ref-hello`), with hyper-util's legacy client
//! and its keep-alive pool, and nothing else: no route table, no header rewriting beyond the
//! URI, no retries. The reference for a cached user GET through the gateway.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse as _, Response};
use clap::Parser as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A bare one-hop HTTP/1.1 proxy (pooled keep-alive connections to the upstream).
#[derive(Debug, clap::Parser)]
#[command(name = "ref-proxy")]
struct Args {
    #[command(flatten)]
    listen: reference::Listen,
    /// Where every request goes (scheme, host and port; the path and query are the request's).
    #[arg(long, default_value = "http://127.0.0.1:18090")]
    upstream: Uri,
    /// Idle connections kept open to the upstream.
    #[arg(long, default_value_t = 1024)]
    pool_max_idle: usize,
}

#[derive(Clone)]
struct Proxy {
    client: Client<HttpConnector, Body>,
    authority: axum::http::uri::Authority,
    scheme: axum::http::uri::Scheme,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let authority = args
        .upstream
        .authority()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("--upstream needs a host and port"))?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.pool_max_idle)
        .build(connector);
    let proxy = Proxy {
        client,
        authority,
        scheme: args
            .upstream
            .scheme()
            .cloned()
            .unwrap_or(axum::http::uri::Scheme::HTTP),
    };
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    reference::serve("ref-proxy", &args.listen, app).await
}

async fn forward(State(proxy): State<Proxy>, mut request: Request) -> Response {
    let mut parts = request.uri().clone().into_parts();
    parts.scheme = Some(proxy.scheme.clone());
    parts.authority = Some(proxy.authority.clone());
    let Ok(uri) = Uri::from_parts(parts) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    *request.uri_mut() = uri;
    match proxy.client.request(request).await {
        Ok(response) => response.map(Body::new),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}
