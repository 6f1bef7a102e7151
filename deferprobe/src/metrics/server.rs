//! The HTTP side of `--metrics-addr`: the listening socket, bound before anything is attached
//! (a bad address is an error before the target is touched), and a small HTTP/1 server
//! (hyper) on deferprobe's tokio runtime that answers `GET /metrics` with the registry's
//! text.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// A scraper that sends no request within this long is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The `--metrics-addr` socket, bound.
pub struct MetricsListener {
    listener: std::net::TcpListener,
    address: SocketAddr,
}

impl MetricsListener {
    /// Binds `address` now. An address in use, one that is not this machine's, or a port
    /// this user may not bind is an output that can't be created (exit code 73).
    pub fn bind(address: SocketAddr) -> Result<MetricsListener> {
        let refuse = |err: std::io::Error| {
            Error::cannot_create(format!("--metrics-addr {address}: cannot listen there: {err}"))
        };
        let listener = std::net::TcpListener::bind(address).map_err(refuse)?;
        listener.set_nonblocking(true).map_err(refuse)?;
        let address = listener.local_addr().map_err(refuse)?;
        Ok(MetricsListener { listener, address })
    }

    /// The address bound (with the port the kernel chose, for port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves `registry` at `/metrics` on the current tokio runtime until it stops. Needs a
    /// tokio runtime context.
    pub fn serve(self, registry: Registry) -> Result<()> {
        let listener = tokio::net::TcpListener::from_std(self.listener).map_err(|err| {
            Error::internal(format!("--metrics-addr {}: serving: {err}", self.address))
        })?;
        info!(url = %format!("http://{}/metrics", self.address), "serving metrics");
        let registry = Arc::new(registry);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors, say: the trace goes on, later scrapes may work.
                        warn!(%err, "metrics: accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let registry = registry.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let registry = registry.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&request, &registry)) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(err) = served {
                        debug!(%err, %peer, "metrics: connection ended with an error");
                    }
                });
            }
        });
        Ok(())
    }
}

/// `GET /metrics` (or HEAD): the metrics; any other path 404, any other method 405.
fn answer(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = header::HeaderValue::from_str(content_type) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response
    };
    let text = "text/plain; charset=utf-8";
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            respond(StatusCode::OK, super::CONTENT_TYPE, super::encode(registry))
        }
        (_, "/metrics") => {
            respond(StatusCode::METHOD_NOT_ALLOWED, text, "only GET /metrics\n".into())
        }
        _ => respond(StatusCode::NOT_FOUND, text, "deferprobe serves /metrics only\n".into()),
    }
}
