//! The HTTP side of `serve`, on hyper: `/metrics` and `/healthz`, each
//! answered by a visit to the live loop, which holds the program.

use std::{convert::Infallible, time::Duration};

use anyhow::Result;
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{ACCEPT, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    HeaderMap, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use super::ServeState;
use crate::source::Visit;

pub type Visits = mpsc::UnboundedSender<Visit<ServeState>>;

/// The live loop drains every 50 ms: one that has not answered within this
/// long is stuck, or gone.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// A scrape reads the kernel's arrays and renders the page.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Accepts connections until the runtime ends.
pub async fn serve(listener: TcpListener, visits: Visits) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let visits = visits.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, visits.clone()));
            // A client that hangs up mid-request is its own business.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    visits: Visits,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let openmetrics = wants_openmetrics(req.headers());
            let page = visit(&visits, SCRAPE_TIMEOUT, move |program, totals, state| {
                state.page(program, totals, openmetrics)
            })
            .await;
            match page {
                Some(Ok(page)) => {
                    let kind = if openmetrics {
                        OPENMETRICS_TEXT
                    } else {
                        PROMETHEUS_TEXT
                    };
                    reply(StatusCode::OK, kind, page)
                }
                Some(Err(err)) => unavailable(format!("reading the kernel's sums: {err:#}\n")),
                None => unavailable("tracing has stopped or is stuck\n".into()),
            }
        }
        "/healthz" => match visit(&visits, HEALTH_TIMEOUT, |_, _, _| ()).await {
            Some(()) => reply(
                StatusCode::OK,
                "text/plain",
                "ok: attached, events flowing\n".into(),
            ),
            None => unavailable("tracing has stopped or is stuck\n".into()),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ),
    })
}

/// Runs `look` in the live loop; `None` if the loop did not answer in time.
async fn visit<T: Send + 'static>(
    visits: &Visits,
    limit: Duration,
    look: impl FnOnce(&crate::kernel::Program, &crate::source::Totals, &mut ServeState) -> T
        + Send
        + 'static,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    let sent = visits.send(Box::new(move |program, totals, state| {
        let _ = tx.send(look(program, totals, state));
    }));
    sent.ok()?;
    tokio::time::timeout(limit, rx).await.ok()?.ok()
}

/// Prometheus asks for OpenMetrics first in its `Accept`; plain clients get
/// the classic text format.
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn unavailable(why: String) -> Response<Full<Bytes>> {
    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why)
}

fn reply(status: StatusCode, kind: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(kind) = kind.parse() {
        response.headers_mut().insert(CONTENT_TYPE, kind);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked() {
        let mut headers = HeaderMap::new();
        assert!(!wants_openmetrics(&headers));
        headers.insert(ACCEPT, "*/*".parse().unwrap());
        assert!(!wants_openmetrics(&headers));
        let prometheus =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        headers.insert(ACCEPT, prometheus.parse().unwrap());
        assert!(wants_openmetrics(&headers));
    }
}
