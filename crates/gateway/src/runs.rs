//! The read API: `GET /v1/runs`, `GET /v1/runs/{run}` (state) and
//! `GET /v1/runs/{run}/events` (a page of history).

use std::sync::Arc;

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use runcast_bus::RunFilter;
use runcast_core::{ErrorCode, RunId, RunStatus, frame};

use crate::{
    auth::Grant,
    error::{ApiError, bus_error, json, truncate},
    extract::{RawQuery, Run, query_limit, query_param, query_u64},
    gateway::Gateway,
};

/// A 403 unless `grant` covers `run`.
pub fn allowed(grant: &Grant, run: &RunId) -> Result<(), ApiError> {
    if grant.allows(run) {
        Ok(())
    } else {
        Err(ApiError::for_run(
            ErrorCode::Forbidden,
            run,
            "your token does not cover this run",
        ))
    }
}

/// `GET /v1/runs[?status=running|completed|failed][&limit=N]`
pub async fn list(
    State(gw): State<Arc<Gateway>>,
    grant: Grant,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let limit = query_limit(&q)?.map_or(usize::MAX, |l| l as usize);
    let status = match query_param(&q, "status") {
        None => None,
        Some(s) => Some(RunStatus::parse(&s).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidQuery,
                format!(
                    "status must be running, completed or failed, not {:?}",
                    truncate(&s)
                ),
            )
        })?),
    };
    // A scoped token sees only its runs: filter before applying the limit.
    let fetch = if grant.allows_all() {
        limit
    } else {
        usize::MAX
    };
    let runs = gw
        .bus
        .runs(RunFilter {
            status,
            limit: fetch,
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
    let runs: Vec<_> = runs
        .into_iter()
        .filter(|r| grant.allows(&r.run))
        .take(limit)
        .collect();
    let body = encode_runs(&runs).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("could not encode the run list: {e}"),
        )
    })?;
    Ok(json(StatusCode::OK, body))
}

/// `{"runs":[..]}`, straight from the states, never through a `Value`:
/// they hold publisher data verbatim (see `frame::encode_state`).
pub(crate) fn encode_runs(runs: &[runcast_core::RunState]) -> Result<String, serde_json::Error> {
    #[derive(serde::Serialize)]
    struct Runs<'a> {
        runs: &'a [runcast_core::RunState],
    }
    serde_json::to_string(&Runs { runs })
}

/// `GET /v1/runs/{run}`: the run's state.
pub async fn state(
    State(gw): State<Arc<Gateway>>,
    grant: Grant,
    Run(run): Run,
) -> Result<Response, ApiError> {
    allowed(&grant, &run)?;
    match gw.bus.state(&run).await {
        Ok(Some(s)) => match serde_json::to_string(&s) {
            Ok(body) => Ok(json(StatusCode::OK, body)),
            Err(e) => Err(ApiError::for_run(
                ErrorCode::Internal,
                &run,
                format!("could not encode the run's state: {e}"),
            )),
        },
        Ok(None) => Err(ApiError::for_run(
            ErrorCode::RunNotFound,
            &run,
            format!("run {run} has no retained events"),
        )),
        Err(e) => Err(bus_error(e, &run).into()),
    }
}

/// `GET /v1/runs/{run}/events?since=N&limit=M`: one page of history.
pub async fn history(
    State(gw): State<Arc<Gateway>>,
    grant: Grant,
    Run(run): Run,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    allowed(&grant, &run)?;
    let since = query_u64(&q, "since")?.unwrap_or(0);
    let limit = query_limit(&q)?.unwrap_or(100).min(1000) as usize;
    let page = page_after(&gw, &run, since, limit).await?;
    Ok(json(StatusCode::OK, encode_history(&run, &page, since)).into_response())
}

/// Up to `limit` events after `since` (none for 0, just the head), or
/// `since_out_of_range` when `since` is past the run's head: the one check
/// of a cursor before history or a stream is served.
pub async fn page_after(
    gw: &Gateway,
    run: &RunId,
    since: u64,
    limit: usize,
) -> Result<runcast_bus::Page, ApiError> {
    let page = gw
        .bus
        .read(run, since.saturating_add(1), limit)
        .await
        .map_err(|e| bus_error(e, run))?;
    if since > page.head {
        return Err(ApiError::for_run(
            ErrorCode::SinceOutOfRange,
            run,
            format!("since {since} is past the run's last seq {}", page.head),
        ));
    }
    Ok(page)
}

/// A history page's body: `{"run","events":[event frames],"first","head","next_since","gap"}`.
pub(crate) fn encode_history(run: &RunId, page: &runcast_bus::Page, since: u64) -> String {
    let mut body = String::from("{\"run\":\"");
    body.push_str(run.as_str());
    body.push_str("\",\"events\":[");
    for (i, ev) in page.events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&frame::encode_event(ev));
    }
    let next = page
        .events
        .last()
        .map_or(since.max(page.first.saturating_sub(1)), |e| e.seq);
    let gap = (since + 1 < page.first && page.first > 1).then(|| (since + 1, page.first - 1));
    body.push_str(&format!(
        "],\"first\":{},\"head\":{},\"next_since\":{},\"gap\":{}}}",
        page.first,
        page.head,
        next,
        gap.map_or("null".to_string(), |(f, t)| format!(
            "{{\"from\":{f},\"to\":{t}}}"
        ))
    ));
    body
}
