//! The fake OpenAI server over real HTTP: completions, rate limits, auth, scripts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use flotilla_testkit::{Behaviour, FakeConfig, FakeOpenAi};
use serde_json::{Value, json};

fn body(content: &str, max_tokens: Option<u32>) -> Value {
    let mut b = json!({
        "model": "fake-model",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.2,
    });
    if let Some(m) = max_tokens {
        b["max_tokens"] = json!(m);
    }
    b
}

async fn post(server: &FakeOpenAi, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", server.base_url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

fn header_u64(resp: &reqwest::Response, name: &str) -> u64 {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn answers_in_the_openai_shape_with_estimated_usage() {
    let server = FakeOpenAi::start(FakeConfig::default()).await.unwrap();
    assert!(server.base_url().starts_with("http://127.0.0.1:"));
    assert!(server.base_url().ends_with("/v1"));
    // 9 chars -> ceil(9 / 4) = 3 prompt tokens; completion min(20, 50) = 20.
    let resp = post(&server, &body("123456789", Some(20))).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "fake-model");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "fake reply to 9 chars"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 20, "total_tokens": 23})
    );
    // Without max_tokens the configured completion size is used.
    let v: Value = post(&server, &body("abcd", None))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 50);
    let stats = server.stats();
    assert_eq!((stats.requests, stats.ok, stats.tokens), (2, 2, 23 + 51));
    assert_eq!(server.requests_log()[0], body("123456789", Some(20)));

    let models: Value = reqwest::get(format!("{}/models", server.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "fake-model");
}

#[tokio::test]
async fn structured_requests_get_schema_shaped_json() {
    let server = FakeOpenAi::start(FakeConfig::default()).await.unwrap();
    let mut b = body("plan it", None);
    b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": ["summary"], "properties": {"summary": {"type": "string"}}
    }}});
    let v: Value = post(&server, &b).await.json().await.unwrap();
    let content: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(content["summary"].is_string());

    b["response_format"] = json!({"type": "json_object"});
    let v: Value = post(&server, &b).await.json().await.unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(content).unwrap().is_object());

    b["response_format"] = json!({"type": "xml"});
    assert_eq!(post(&server, &b).await.status(), 400);
    assert_eq!(server.stats().http_4xx, 1);
}

#[tokio::test]
async fn rpm_limit_answers_429_then_recovers_after_the_window() {
    let window = Duration::from_secs(3);
    let server = FakeOpenAi::start(FakeConfig {
        rpm: Some(5),
        window,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(post(&server, &body("hi", None)).await.status(), 200);
    }
    let resp = post(&server, &body("hi", None)).await;
    // Six local requests in well under 3 s, even on a busy machine.
    assert!(start.elapsed() < window, "test machine too slow");
    assert_eq!(resp.status(), 429);
    let secs = header_u64(&resp, "retry-after");
    let ms = header_u64(&resp, "retry-after-ms");
    assert!((1..=3).contains(&secs), "{secs}");
    assert!((1..=3000).contains(&ms), "{ms}");
    assert_eq!(secs, ms.div_ceil(1000));
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "rate_limit_exceeded");
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    let stats = server.stats();
    assert_eq!((stats.requests, stats.ok, stats.http_429), (6, 5, 1));
    assert_eq!(stats.max_requests_in_window, 5);

    // Waiting as told frees a slot (the oldest request leaves the window).
    tokio::time::sleep(Duration::from_millis(ms + 100)).await;
    assert_eq!(post(&server, &body("hi", None)).await.status(), 200);
    assert_eq!(server.stats().ok, 6);
}

#[tokio::test]
async fn tpm_limit_counts_the_request_estimate() {
    let server = FakeOpenAi::start(FakeConfig {
        tpm: Some(100),
        window: Duration::from_secs(60),
        completion_tokens: 10,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    // 40 chars = 10 prompt tokens; estimate 10 + 60 = 70 <= 100; charged 10 + 10 = 20.
    let forty = "x".repeat(40);
    assert_eq!(post(&server, &body(&forty, Some(60))).await.status(), 200);
    assert_eq!(server.stats().tokens, 20);
    // 20 charged + 70 estimated = 90: fine; now 40 charged.
    assert_eq!(post(&server, &body(&forty, Some(60))).await.status(), 200);
    // 40 + 70 = 110 > 100: refused, although the charge would only be 20.
    let resp = post(&server, &body(&forty, Some(60))).await;
    assert_eq!(resp.status(), 429);
    assert!(header_u64(&resp, "retry-after") >= 1);
    // A smaller estimate still fits: 40 + 10 + 50 = 100.
    assert_eq!(post(&server, &body(&forty, Some(50))).await.status(), 200);
    let stats = server.stats();
    assert_eq!((stats.ok, stats.http_429, stats.tokens), (3, 1, 60));
    assert_eq!(stats.max_tokens_in_window, 60);
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let server = FakeOpenAi::start(FakeConfig {
        api_key: Some("sk-test".into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let url = format!("{}/chat/completions", server.base_url());
    let client = reqwest::Client::new();
    let no_key = client
        .post(&url)
        .json(&body("a", None))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let wrong = client
        .post(&url)
        .bearer_auth("sk-wrong")
        .json(&body("a", None))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = client
        .post(&url)
        .bearer_auth("sk-test")
        .json(&body("a", None))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let stats = server.stats();
    assert_eq!((stats.requests, stats.http_4xx, stats.ok), (3, 2, 1));
}

#[tokio::test]
async fn scripts_are_consumed_one_per_request() {
    let server = FakeOpenAi::start(FakeConfig {
        reply: Some("fixed".into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    server.push_script(Behaviour::Status(503));
    server.push_script(Behaviour::RateLimited {
        retry_after: Duration::from_millis(1500),
    });
    server.push_script(Behaviour::Truncated);
    server.push_script(Behaviour::Malformed);
    server.push_script(Behaviour::Content("scripted".into()));
    server.push_script(Behaviour::Slow(Duration::from_millis(300)));
    assert_eq!(server.script_len(), 6);

    let r = post(&server, &body("a", None)).await;
    assert_eq!(r.status(), 503);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());

    let r = post(&server, &body("a", None)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header_u64(&r, "retry-after"), 2);
    assert_eq!(header_u64(&r, "retry-after-ms"), 1500);

    let r = post(&server, &body("a", None)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.is_empty());
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    let r: Value = post(&server, &body("a", None)).await.json().await.unwrap();
    assert!(r.get("choices").is_none());

    let r: Value = post(&server, &body("a", None)).await.json().await.unwrap();
    assert_eq!(r["choices"][0]["message"]["content"], "scripted");

    let start = Instant::now();
    let r: Value = post(&server, &body("a", None)).await.json().await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(r["choices"][0]["message"]["content"], "fixed");

    // Script exhausted: normal answers.
    let r: Value = post(&server, &body("a", None)).await.json().await.unwrap();
    assert_eq!(r["choices"][0]["message"]["content"], "fixed");

    let stats = server.stats();
    assert_eq!(stats.requests, 7);
    assert_eq!(stats.http_5xx, 1);
    assert_eq!(stats.http_429, 1);
    assert_eq!(stats.faults, 2);
    assert_eq!(stats.ok, 3);
    assert_eq!(server.script_len(), 0);
}

#[tokio::test]
async fn stops_serving_on_drop() {
    let server = FakeOpenAi::start(FakeConfig::default()).await.unwrap();
    let addr = server.addr();
    drop(server);
    // The listener closes once the server task sees the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting after drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
