//! WebSocket upgrades through the gateway (the chat service's `/api/v1/chats/{id}/stream`).
//!
//! A request with `Connection: upgrade` and `Upgrade: websocket` goes through the same route
//! table, token check, rate limit and edge policy as any other (`forward`), then here instead of
//! the plain proxy: the upgrade request is sent to one replica (no retry: the upstream decides
//! who may subscribe), and when it answers `101 Switching Protocols` both connections are
//! upgraded (hyper's upgrade on the client side and on the upstream side) and bytes are copied
//! both ways until either closes. Any other answer (403, 404, 503) is passed back as it is.
//!
//! Browsers cannot set headers on a WebSocket, so for an upgrade the bearer token may come as the
//! `access_token` query parameter instead of `Authorization`; it is checked like the header and
//! removed from the query the upstream sees.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use kit::ApiError;

use crate::Gateway;
use crate::upstream::Outcome;

/// Whether `headers` ask for a WebSocket upgrade.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    let connection = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    websocket && connection
}

/// The `access_token` query parameter (percent-decoded), if any.
pub fn query_token(uri: &Uri) -> Option<String> {
    let query = uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

/// `query` without its `access_token` parameters (`None` when nothing is left).
pub fn without_token(query: Option<&str>) -> Option<String> {
    let query = query?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split('=').next() != Some("access_token"))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Sends the upgrade request to a replica of `service` as `path` and, on 101, joins the two
/// connections.
pub(crate) async fn proxy(
    gateway: &Gateway,
    service: &str,
    route: &std::sync::Arc<str>,
    path: String,
    mut request: Request,
) -> Response {
    let Some(upstream) = gateway.upstreams.get(service) else {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_not_configured",
            format!("The {service} service has no configured address"),
        )
        .into_response();
    };
    let order: Vec<usize> = upstream.rotation().collect();
    let Some(replica) = upstream.pick(&order, &[]) else {
        upstream.rejected();
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            format!("The {service} service is unavailable; try again shortly"),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let target = &upstream.replicas[replica];
    let path_and_query = match without_token(request.uri().query()) {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let uri: Uri = match format!(
        "{}{}",
        target.url.as_str().trim_end_matches('/'),
        path_and_query
    )
    .parse()
    {
        Ok(uri) => uri,
        Err(err) => {
            return ApiError::internal(anyhow::Error::from(err)).into_response();
        }
    };
    let client_side = hyper::upgrade::on(&mut request);
    let (parts, _) = request.into_parts();
    let mut headers = parts.headers;
    let upgrade = headers.get(header::UPGRADE).cloned();
    crate::strip_hop_by_hop(&mut headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
    }
    if let Some(host) = headers.remove(header::HOST) {
        headers.insert(crate::X_FORWARDED_HOST.clone(), host);
    }
    headers.remove(&crate::X_FORWARDED_FOR);
    if let Some(peer) = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        && let Some(value) = crate::forwarded_for(None, peer.0.ip())
    {
        headers.insert(crate::X_FORWARDED_FOR.clone(), value);
    }
    let trace = parts
        .extensions
        .get::<kit::trace::TraceContext>()
        .copied()
        .unwrap_or_else(kit::trace::TraceContext::generate);
    headers.insert(
        kit::trace::TRACEPARENT.clone(),
        trace.child().header_value(),
    );
    let mut outgoing = Request::new(Body::empty());
    *outgoing.method_mut() = parts.method;
    *outgoing.uri_mut() = uri;
    *outgoing.headers_mut() = headers;
    let sent =
        tokio::time::timeout(gateway.upstream_timeout, gateway.client.request(outgoing)).await;
    let mut response = match sent {
        Ok(Ok(response)) => {
            upstream.record(
                replica,
                route,
                Outcome::Status(response.status().as_u16()),
                true,
            );
            target.outage.succeeded();
            response
        }
        Ok(Err(err)) => {
            upstream.record(replica, route, Outcome::Error, false);
            target.outage.failed(&err);
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                format!("The {service} service is unavailable; try again shortly"),
            )
            .with_source(Some(err.into()))
            .into_response();
        }
        Err(_) => {
            upstream.record(replica, route, Outcome::Timeout, false);
            return ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!("The {service} service did not answer in time"),
            )
            .into_response();
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        crate::strip_hop_by_hop(&mut parts.headers);
        return Response::from_parts(parts, Body::new(body));
    }
    let upstream_side = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let (client, upstream) = tokio::join!(client_side, upstream_side);
        match (client, upstream) {
            (Ok(client), Ok(upstream)) => {
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(error.message = %err, "a proxied WebSocket ended with an error");
                }
            }
            (client, upstream) => {
                tracing::debug!(
                    client_ok = client.is_ok(),
                    upstream_ok = upstream.is_ok(),
                    "a WebSocket upgrade did not complete"
                );
            }
        }
    });
    // The upstream's 101 with its handshake headers (Upgrade, Connection, Sec-WebSocket-Accept).
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Body::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_are_recognised() {
        let mut headers = HeaderMap::new();
        assert!(!is_upgrade(&headers));
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(!is_upgrade(&headers), "Connection: upgrade is needed too");
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&headers));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_upgrade(&headers), "only WebSocket");
    }

    #[test]
    fn the_query_token_is_read_and_not_forwarded() {
        let uri: Uri = "/api/v1/chats/c/stream?a=1&access_token=x%2By&b=2"
            .parse()
            .expect("uri");
        assert_eq!(query_token(&uri).as_deref(), Some("x+y"));
        assert_eq!(without_token(uri.query()).as_deref(), Some("a=1&b=2"));
        assert_eq!(without_token(Some("access_token=t")), None);
        assert_eq!(without_token(None), None);
    }
}
