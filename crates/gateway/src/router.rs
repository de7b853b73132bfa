//! Every HTTP route, in one table, and what applies to all of them: CORS,
//! 404 and 405 (with `Allow`) as JSON errors, and the count of every error
//! response by code.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{MethodFilter, get, on, post},
};
use runcast_core::ErrorCode;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    admin,
    error::{ApiError, Failed, truncate},
    gateway::{ConnInfo, Gateway},
    publish, runs, sse, ws,
};

const PAGE: &str = include_str!("page.html");
/// `@runcast/client`, the very file the npm package ships: the page imports
/// it from here, and so can any page that wants no bundler and no CDN.
const CLIENT_JS: &str = include_str!("../../../clients/js/runcast-client.js");

/// The gateway's HTTP surface.
pub fn router(gw: Arc<Gateway>) -> Router {
    let routes = Router::new()
        .route("/", get(page))
        .route("/v1/client.js", get(client_js))
        .route("/healthz", get(|| async { text("text/plain", "ok\n") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/ws",
            on(MethodFilter::GET.or(MethodFilter::CONNECT), ws::upgrade),
        )
        .route("/v1/runs", get(runs::list))
        .route("/v1/runs/{run}", get(runs::state))
        .route(
            "/v1/runs/{run}/events",
            get(runs::history).post(publish::publish),
        )
        .route("/v1/runs/{run}/stream", get(sse::stream))
        .route("/v1/admin/stats", get(admin::get_stats))
        .route("/v1/admin/drain", post(admin::post_drain))
        .route("/v1/admin/shed", post(admin::post_shed))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let routes = match cors(&gw) {
        Some(layer) => routes.layer(layer),
        None => routes,
    };
    routes
        .layer(middleware::from_fn_with_state(gw.clone(), count_errors))
        .with_state(gw)
}

/// CORS for the allow-list (`--allowed-origin`): a listed origin may read
/// responses and POST JSON with a key or token. Without a list there is no
/// CORS at all (same-origin pages and non-browser clients need none).
fn cors(gw: &Arc<Gateway>) -> Option<CorsLayer> {
    if gw.config.allowed_origins.is_empty() {
        return None;
    }
    let gw = gw.clone();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
                origin.to_str().is_ok_and(|o| gw.origin_allowed(o))
            }))
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-runcast-key"),
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("traceparent"),
                HeaderName::from_static("idempotency-key"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Counts every error response by its code, whichever route or layer
/// answered it: one place, so no error goes uncounted.
async fn count_errors(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let http1 = req.version() <= Version::HTTP_11;
    let conn = req.extensions().get::<ConnInfo>().cloned();
    let mut resp = next.run(req).await;
    if let Some(Failed(code)) = resp.extensions().get::<Failed>() {
        let code = *code;
        gw.metrics
            .protocol_errors
            .with_label_values(&[code.as_str()])
            .inc();
        tracing::debug!(%method, status = resp.status().as_u16(), code = code.as_str(), "request failed");
        // A draining gateway's 503 also ends the connection (after this
        // response; a GOAWAY over HTTP/2), so the client's next request
        // goes through the load balancer to another pod, not down the same
        // keep-alive connection to this one.
        if code == ErrorCode::Draining {
            if http1 {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            if let Some(c) = conn {
                c.activity.close_soon();
            }
        }
    }
    resp
}

/// Routes ignore one trailing slash (`/v1/runs/` is `/v1/runs`).
pub fn normalize_path<B>(req: &mut hyper::Request<B>) {
    let path = req.uri().path();
    if path.len() <= 1 || !path.ends_with('/') {
        return;
    }
    let trimmed = path.trim_end_matches('/');
    let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
    let pq = match req.uri().query() {
        Some(q) => format!("{trimmed}?{q}"),
        None => trimmed.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

fn text(ctype: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let mut r = Response::new(body.into());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

async fn page() -> Response {
    text("text/html; charset=utf-8", PAGE)
}

async fn client_js() -> Response {
    let mut r = text("text/javascript; charset=utf-8", CLIENT_JS);
    // Revalidated on every load, so a page never runs a client older than
    // the gateway it talks to.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Result<Response, ApiError> {
    if gw.is_draining() {
        return Err(ApiError::new(ErrorCode::Draining, "gateway is draining"));
    }
    match gw.bus.health() {
        Ok(()) => Ok(text("text/plain", "ready\n")),
        Err(why) => Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("bus not ready: {why}"),
        )),
    }
}

/// `/metrics`, with the bus's gauges refreshed first.
async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let up = gw.bus.health().is_ok();
    gw.metrics.record_bus(gw.bus.stats());
    gw.metrics.bus_up.set(i64::from(up));
    gw.metrics.ready.set(i64::from(up && !gw.is_draining()));
    text("text/plain; version=0.0.4", gw.metrics.render())
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route for {}", truncate(uri.path())),
    )
}

/// axum adds the `Allow` header to this response.
async fn method_not_allowed(method: Method) -> Response {
    let mut r = ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "method {} is not allowed here; see the Allow header",
            truncate(method.as_str())
        ),
    )
    .into_response();
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}
