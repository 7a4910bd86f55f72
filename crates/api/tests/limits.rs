//! The HTTP limits of issue #14 on the real SmolLM2: a streaming client that stops reading
//! is dropped after the stall limit and frees the engine; a full queue answers 429 with
//! `Retry-After` (and `/metrics` counts it); stop strings are capped; and over a real socket,
//! a client that trickles its headers or its body is cut off at the read deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::model;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use shoal_api::{app, AppState, HttpLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

fn ready(limits: HttpLimits) -> (AppState, Router) {
    let state = AppState::with_limits("smollm2".into(), None, limits);
    state.set_ready(model());
    (state.clone(), app(state))
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> Request<Body> {
    Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "temperature": 0})
                .to_string(),
        ))
        .unwrap()
}

async fn body_of(res: axum::response::Response) -> String {
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

async fn metrics(app: &Router) -> String {
    let res = app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    body_of(res).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_frees_the_engine() {
    let stall = Duration::from_secs(2);
    let (_, app) = ready(HttpLimits {
        client_stall_timeout: stall,
        ..HttpLimits::default()
    });
    // A long streamed answer whose client takes one piece and then reads nothing (it
    // keeps the response open: it has not gone away).
    let res = app
        .clone()
        .oneshot(completion("1, 2, 3, 4, 5,", 4000, true))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut stalled = res.into_body().into_data_stream();
    assert!(stalled.next().await.is_some());

    // Another client is served once the stall limit has passed, not after 4000 tokens.
    let started = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(120),
        app.clone().oneshot(completion("Hi", 2, false)),
    )
    .await
    .expect("the second client is served")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let waited = started.elapsed();
    assert!(waited < stall + Duration::from_secs(15), "{waited:?}");
    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "shoal_requests_cancelled_total"),
        1.0,
        "{text}"
    );
    assert!(
        metric(&text, "shoal_generated_tokens_total") < 1000.0,
        "{text}"
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let (_, app) = ready(HttpLimits {
        max_queue: 1,
        ..HttpLimits::default()
    });
    // One generation holds the engine (its client reads slowly: not at all, for now) ...
    let res = app
        .clone()
        .oneshot(completion("1, 2, 3, 4, 5,", 4000, true))
        .await
        .unwrap();
    let mut holder = res.into_body().into_data_stream();
    assert!(holder.next().await.is_some());
    // ... one waits for it ...
    let waiting = tokio::spawn(app.clone().oneshot(completion("Hi", 2, false)));
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&metrics(&app).await, "shoal_requests_queued") < 1.0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and the next is turned away at once.
    let res = app
        .clone()
        .oneshot(completion("Hello", 2, false))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers().get(header::RETRY_AFTER).unwrap(), "5");
    let body: Value = serde_json::from_str(&body_of(res).await).unwrap();
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(
        metric(&metrics(&app).await, "shoal_requests_rejected_total"),
        1.0
    );
    // The client that held the engine leaves; the one waiting is served.
    drop(holder);
    let res = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn stop_strings_are_capped_in_number_and_length() {
    let (_, app) = ready(HttpLimits {
        max_stop: 2,
        max_stop_len: 8,
        ..HttpLimits::default()
    });
    for stop in [json!(["a", "b", "c"]), json!(["a much longer stop"])] {
        let req = Request::post("/v1/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"prompt": "Hi", "max_tokens": 2, "stop": stop}).to_string(),
            ))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let body: Value = serde_json::from_str(&body_of(res).await).unwrap();
        assert_eq!(body["error"]["param"], "stop", "{body}");
    }
}

/// A node's API on a real socket with a 1-second read deadline.
async fn serve_with_read_deadline() -> std::net::SocketAddr {
    let state = AppState::with_limits(
        "smollm2".into(),
        None,
        HttpLimits {
            request_read_timeout: Duration::from_secs(1),
            ..HttpLimits::default()
        },
    );
    state.set_ready(model());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(shoal_api::serve(listener, state, std::future::pending()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trickles_its_request_is_cut_off() {
    let addr = serve_with_read_deadline().await;
    // Headers that never end (slowloris): the connection is closed.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut got))
        .await
        .expect("closed at the header deadline")
        .ok();
    // A body that never arrives in full: 408 in OpenAI's shape.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\nConnection: close\r\n\r\n{\"prompt\":",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut got))
        .await
        .expect("answered at the body deadline")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    // A well-behaved client on the same server is served.
    let mut good = tokio::net::TcpStream::connect(addr).await.unwrap();
    good.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    good.read_to_end(&mut got).await.unwrap();
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}
