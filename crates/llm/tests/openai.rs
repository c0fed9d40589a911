//! The OpenAI-compatible client against the testkit's fake server: usage, 429s,
//! retries, timeouts, broken bodies, structured-output repair, and the API key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use flotilla_llm::{
    ChatMessage, CompletionRequest, LlmClient, LlmError, OpenAiClient, OpenAiConfig,
    ResponseFormat, Usage, estimate_prompt_tokens,
};
use flotilla_testkit::{Behaviour, FakeConfig, FakeOpenAi};
use serde_json::{Value, json};

async fn fake() -> FakeOpenAi {
    FakeOpenAi::start(FakeConfig::default()).await.unwrap()
}

/// A client with quick backoff and generous timeouts.
fn client(server: &FakeOpenAi, max_retries: u32) -> OpenAiClient {
    OpenAiClient::new(OpenAiConfig {
        base_url: server.base_url(),
        max_retries,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        timeout: Duration::from_secs(30),
        ..OpenAiConfig::default()
    })
    .unwrap()
}

fn request(user: &str, max_tokens: Option<u32>) -> CompletionRequest {
    CompletionRequest {
        model: "fake-model".into(),
        messages: vec![ChatMessage::system("be brief"), ChatMessage::user(user)],
        response_format: None,
        max_tokens,
    }
}

fn summary_schema() -> Value {
    json!({
        "type": "object",
        "required": ["summary"],
        "properties": {"summary": {"type": "string"}},
        "additionalProperties": false
    })
}

fn structured_request() -> CompletionRequest {
    CompletionRequest {
        response_format: Some(ResponseFormat {
            name: "flotilla_synthesis".into(),
            schema: summary_schema().into(),
        }),
        ..request("summarize", Some(30))
    }
}

#[tokio::test]
async fn completes_and_counts_reported_usage() {
    let server = fake().await;
    let req = request(&"x".repeat(40), Some(20));
    let c = client(&server, 3).complete(&req).await.unwrap();
    // "be brief" (8) + 40 chars = 48 -> 12 prompt tokens; completion min(20, 50).
    assert_eq!(c.content, "fake reply to 48 chars");
    assert_eq!(
        c.usage,
        Usage {
            prompt_tokens: 12,
            completion_tokens: 20
        }
    );
    assert_eq!(estimate_prompt_tokens(&req.messages), 12, "same estimator");
    assert_eq!(server.stats().tokens, u64::from(c.usage.total()));
    let sent = &server.requests_log()[0];
    assert_eq!(sent["model"], "fake-model");
    assert_eq!(sent["max_tokens"], 20);
    assert_eq!(
        sent["messages"][1],
        json!({"role": "user", "content": "x".repeat(40)})
    );
    assert!(sent.get("response_format").is_none());
}

#[tokio::test]
async fn missing_usage_is_estimated() {
    let server = fake().await;
    server.push_script(Behaviour::Raw {
        status: 200,
        body: json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "abcdefghi"}}]})
            .to_string(),
    });
    let req = request("hello", None);
    let c = client(&server, 0).complete(&req).await.unwrap();
    assert_eq!(c.content, "abcdefghi");
    // "be brief" + "hello" = 13 chars -> 4; "abcdefghi" -> 3.
    assert_eq!(
        c.usage,
        Usage {
            prompt_tokens: 4,
            completion_tokens: 3
        }
    );
}

#[tokio::test]
async fn scripted_429_is_returned_with_retry_after_and_not_retried() {
    let server = fake().await;
    server.push_script(Behaviour::RateLimited {
        retry_after: Duration::from_millis(1500),
    });
    let err = client(&server, 3)
        .complete(&request("a", None))
        .await
        .unwrap_err();
    match err {
        LlmError::RateLimited { retry_after } => {
            assert_eq!(retry_after, Some(Duration::from_millis(1500)));
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(server.stats().requests, 1, "a 429 is not retried here");
}

#[tokio::test]
async fn real_rpm_limit_gives_a_retry_after_within_the_window() {
    let window = Duration::from_secs(60);
    let server = FakeOpenAi::start(FakeConfig {
        rpm: Some(1),
        window,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let c = client(&server, 3);
    c.complete(&request("a", None)).await.unwrap();
    match c.complete(&request("a", None)).await.unwrap_err() {
        LlmError::RateLimited {
            retry_after: Some(d),
        } => assert!(d > Duration::from_secs(30) && d <= window, "{d:?}"),
        other => panic!("expected RateLimited with a delay, got {other:?}"),
    }
    let stats = server.stats();
    assert_eq!((stats.requests, stats.ok, stats.http_429), (2, 1, 1));
}

#[tokio::test]
async fn a_5xx_is_retried_then_succeeds() {
    let server = fake().await;
    server.push_script(Behaviour::Status(500));
    let c = client(&server, 3)
        .complete(&request("a", None))
        .await
        .unwrap();
    assert_eq!(c.content, "fake reply to 9 chars");
    let stats = server.stats();
    assert_eq!((stats.requests, stats.http_5xx, stats.ok), (2, 1, 1));
}

#[tokio::test]
async fn persistent_5xx_is_unavailable_after_max_retries_plus_one_attempts() {
    let server = fake().await;
    for _ in 0..6 {
        server.push_script(Behaviour::Status(503));
    }
    let err = client(&server, 2)
        .complete(&request("a", None))
        .await
        .unwrap_err();
    match err {
        LlmError::Unavailable(msg) => {
            assert!(msg.contains("503"), "{msg}");
            assert!(msg.contains("after 3 attempts"), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(server.stats().requests, 3);
    assert_eq!(server.script_len(), 3);
}

#[tokio::test]
async fn client_errors_are_refused_without_retry() {
    for status in [400, 404, 422] {
        let server = fake().await;
        server.push_script(Behaviour::Status(status));
        let err = client(&server, 3)
            .complete(&request("a", None))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LlmError::Refused(m) if m.contains(&status.to_string())),
            "{status}: {err:?}"
        );
        assert_eq!(server.stats().requests, 1, "{status} must not be retried");
    }
}

#[tokio::test]
async fn a_slow_answer_times_out_and_is_retried() {
    let server = fake().await;
    server.push_script(Behaviour::Slow(Duration::from_secs(60)));
    let c = OpenAiClient::new(OpenAiConfig {
        timeout: Duration::from_secs(2),
        ..client(&server, 1).config().clone()
    })
    .unwrap();
    let done = c.complete(&request("a", None)).await.unwrap();
    assert_eq!(done.content, "fake reply to 9 chars");
    assert_eq!(server.stats().requests, 2);

    // Slow every time: Unavailable, saying it timed out.
    server.push_script(Behaviour::Slow(Duration::from_secs(60)));
    server.push_script(Behaviour::Slow(Duration::from_secs(60)));
    let err = c.complete(&request("a", None)).await.unwrap_err();
    assert!(
        matches!(&err, LlmError::Unavailable(m) if m.contains("timed out")),
        "{err:?}"
    );
    assert_eq!(server.stats().requests, 4);
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    // Bound but not listening: the port stays ours and connecting is refused.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let c = OpenAiClient::new(OpenAiConfig {
        base_url: format!("http://127.0.0.1:{port}/v1"),
        max_retries: 1,
        backoff_base: Duration::from_millis(10),
        ..OpenAiConfig::default()
    })
    .unwrap();
    let err = c.complete(&request("a", None)).await.unwrap_err();
    assert!(
        matches!(&err, LlmError::Unavailable(m) if m.contains("connection failed") && m.contains("after 2 attempts")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_truncated_body_is_retried_once() {
    let server = fake().await;
    server.push_script(Behaviour::Truncated);
    let c = client(&server, 3);
    let ok = c.complete(&request("a", None)).await.unwrap();
    assert_eq!(ok.content, "fake reply to 9 chars");
    assert_eq!(server.stats().requests, 2);

    for _ in 0..3 {
        server.push_script(Behaviour::Truncated);
    }
    let err = c.complete(&request("a", None)).await.unwrap_err();
    assert!(
        matches!(&err, LlmError::BadResponse(m) if m.contains("not a chat completion")),
        "{err:?}"
    );
    assert_eq!(server.stats().requests, 4, "only one retry for a bad body");
}

#[tokio::test]
async fn a_body_without_choices_is_bad_response() {
    let server = fake().await;
    server.push_script(Behaviour::Malformed);
    server.push_script(Behaviour::Malformed);
    let err = client(&server, 3)
        .complete(&request("a", None))
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::BadResponse(_)), "{err:?}");
    assert_eq!(server.stats().requests, 2);
    assert_eq!(server.stats().faults, 2);
}

#[tokio::test]
async fn a_model_refusal_is_refused() {
    let server = fake().await;
    server.push_script(Behaviour::Raw {
        status: 200,
        body: json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": "I cannot help"}}]})
            .to_string(),
    });
    let err = client(&server, 3)
        .complete(&structured_request())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LlmError::Refused(m) if m.contains("I cannot help")),
        "{err:?}"
    );
    assert_eq!(server.stats().requests, 1);
}

#[tokio::test]
async fn structured_output_is_sent_as_json_schema_and_checked() {
    let server = fake().await;
    let c = client(&server, 3)
        .complete(&structured_request())
        .await
        .unwrap();
    // The fake answers the smallest valid instance; no repair needed.
    let v: Value = serde_json::from_str(&c.content).unwrap();
    assert!(v["summary"].is_string());
    let log = server.requests_log();
    assert_eq!(log.len(), 1);
    assert_eq!(
        log[0]["response_format"],
        json!({"type": "json_schema", "json_schema": {
            "name": "flotilla_synthesis", "schema": summary_schema(), "strict": false}})
    );
}

#[tokio::test]
async fn invalid_structured_output_gets_one_repair_and_summed_usage() {
    let server = fake().await;
    server.push_script(Behaviour::Content("Sure! {\"summ".into()));
    server.push_script(Behaviour::Content(
        "```json\n{\"summary\": \"fixed\"}\n```".into(),
    ));
    let req = structured_request();
    let c = client(&server, 3).complete(&req).await.unwrap();
    assert_eq!(c.content, "{\"summary\": \"fixed\"}");

    let log = server.requests_log();
    assert_eq!(log.len(), 2);
    let repaired = log[1]["messages"].as_array().unwrap();
    assert_eq!(repaired.len(), 4);
    assert_eq!(repaired[..2], log[0]["messages"].as_array().unwrap()[..]);
    assert_eq!(
        repaired[2],
        json!({"role": "assistant", "content": "Sure! {\"summ"})
    );
    assert_eq!(repaired[3]["role"], "user");
    let repair = repaired[3]["content"].as_str().unwrap();
    assert!(
        repair.starts_with("Your previous answer was invalid: the answer is not valid JSON"),
        "{repair}"
    );
    assert!(repair.ends_with("Answer again with only JSON matching the schema."));
    assert_eq!(log[1]["response_format"], log[0]["response_format"]);

    // Both calls' usage, as the server charged them.
    let first_prompt = estimate_prompt_tokens(&req.messages);
    assert_eq!(c.usage.completion_tokens, 30 + 30);
    assert!(c.usage.prompt_tokens > 2 * first_prompt);
    assert_eq!(u64::from(c.usage.total()), server.stats().tokens);
}

#[tokio::test]
async fn schema_violations_are_named_in_the_repair_and_fail_after_one() {
    let server = fake().await;
    server.push_script(Behaviour::Content("{\"summary\": 7}".into()));
    server.push_script(Behaviour::Content("{\"other\": \"x\"}".into()));
    server.push_script(Behaviour::Content("{\"summary\": \"never asked\"}".into()));
    let err = client(&server, 3)
        .complete(&structured_request())
        .await
        .unwrap_err();
    match err {
        LlmError::BadResponse(m) => {
            assert!(m.contains("after one repair"), "{m}");
            assert!(m.contains("missing required property `summary`"), "{m}");
        }
        other => panic!("expected BadResponse, got {other:?}"),
    }
    let log = server.requests_log();
    assert_eq!(log.len(), 2, "exactly one repair");
    let repair = log[1]["messages"][3]["content"].as_str().unwrap();
    assert!(
        repair.contains("$.summary: expected \"string\", found integer"),
        "{repair}"
    );
    assert_eq!(server.script_len(), 1);
}

#[tokio::test]
async fn json_mode_sends_json_object() {
    let server = fake().await;
    let c = OpenAiClient::new(OpenAiConfig {
        json_mode: true,
        ..client(&server, 0).config().clone()
    })
    .unwrap();
    server.push_script(Behaviour::Content("{\"summary\": \"s\"}".into()));
    c.complete(&structured_request()).await.unwrap();
    assert_eq!(
        server.requests_log()[0]["response_format"],
        json!({"type": "json_object"})
    );
}

#[tokio::test]
async fn api_key_is_sent_as_bearer() {
    let server = FakeOpenAi::start(FakeConfig {
        api_key: Some("sk-right".into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let with = |key: Option<&str>| {
        OpenAiClient::new(OpenAiConfig {
            api_key: key.map(str::to_owned),
            ..client(&server, 3).config().clone()
        })
        .unwrap()
    };
    with(Some("sk-right"))
        .complete(&request("a", None))
        .await
        .unwrap();
    for key in [Some("sk-wrong"), None] {
        let err = with(key).complete(&request("a", None)).await.unwrap_err();
        assert!(
            matches!(&err, LlmError::Refused(m) if m.contains("401")),
            "{key:?}: {err:?}"
        );
    }
    let stats = server.stats();
    assert_eq!((stats.requests, stats.ok, stats.http_4xx), (3, 1, 2));
}
