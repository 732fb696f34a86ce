//! `ref-hello`: a bare axum server answering every GET with a fixed JSON body the size of a
//! cached user (the bytes are encoded once, as a cache hit's are). The reference for a cached
//! user GET on the users port.

use clap::Parser as _;

/// A bare axum hello: every path answers the same small JSON body.
#[derive(Debug, clap::Parser)]
#[command(name = "ref-hello")]
struct Args {
    #[command(flatten)]
    listen: reference::Listen,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let body = bytes::Bytes::from(reference::User::sample(1).to_json());
    let app = axum::Router::new().fallback(axum::routing::get(move || {
        let body = body.clone();
        async move { reference::json(body) }
    }));
    reference::serve("ref-hello", &args.listen, app).await
}
