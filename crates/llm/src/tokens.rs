//! The shared token estimator: what a request is charged before the provider reports
//! real usage (rate-limit permits, budgets), and what a completion without a `usage`
//! object is counted as.
//!
//! The formula is deliberately simple and provider-neutral: **one token per four
//! characters (Unicode scalar values), rounded up**, over the concatenated contents
//! of all messages (roles and the response schema are not counted). The fake
//! OpenAI-compatible server in `flotilla-testkit` charges prompts with exactly this
//! formula, so tests can predict what it counts; keep the two in step.

use crate::client::{ChatMessage, CompletionRequest};

/// Completion tokens assumed for a request that sets no `max_tokens`.
pub const DEFAULT_COMPLETION_TOKENS: u32 = 512;

/// Estimated tokens of `text`: `ceil(chars / 4)`.
pub fn estimate_tokens(text: &str) -> u32 {
    chars_to_tokens(text.chars().count())
}

/// Estimated prompt tokens of `messages`: `ceil(total chars of all contents / 4)`.
pub fn estimate_prompt_tokens(messages: &[ChatMessage]) -> u32 {
    chars_to_tokens(messages.iter().map(|m| m.content.chars().count()).sum())
}

/// Estimated total tokens of `request`: the prompt estimate plus `max_tokens`, or
/// [`DEFAULT_COMPLETION_TOKENS`] when it is not set.
pub fn estimate_request_tokens(request: &CompletionRequest) -> u32 {
    estimate_prompt_tokens(&request.messages)
        .saturating_add(request.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS))
}

fn chars_to_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_per_four_chars() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("a"), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        // Characters, not bytes: four 2-byte characters are one token.
        assert_eq!(estimate_tokens("éééé"), 1);
    }

    #[test]
    fn prompt_sums_chars_before_rounding() {
        let msgs = [ChatMessage::system("abc"), ChatMessage::user("defgh")];
        // 8 chars -> 2 tokens (not 1 + 2 per message).
        assert_eq!(estimate_prompt_tokens(&msgs), 2);
    }

    #[test]
    fn request_adds_max_tokens_or_default() {
        let mut req = CompletionRequest {
            model: "m".into(),
            messages: vec![ChatMessage::user("x".repeat(10))],
            response_format: None,
            max_tokens: Some(7),
        };
        assert_eq!(estimate_request_tokens(&req), 3 + 7);
        req.max_tokens = None;
        assert_eq!(estimate_request_tokens(&req), 3 + DEFAULT_COMPLETION_TOKENS);
    }
}
