//! Checking structured output: parse a model's answer as JSON and validate it against
//! the requested JSON Schema, structurally.
//!
//! The check is a small subset of JSON Schema, enough to catch the answers models get
//! wrong: `type` (a name or a list), `enum`, `const`, `required`, `properties`,
//! `additionalProperties: false` or a schema, `items`, `minItems`/`maxItems`,
//! `anyOf`/`oneOf` (both read as "at least one"), `allOf`, and local `$ref`s
//! (`#/$defs/...`, `#/definitions/...`) such as `schemars` generates. Other keywords
//! (formats, patterns, numeric bounds) are ignored: the caller's own validation of the
//! decoded type stays the authority.

use serde_json::Value;

/// How deep `$ref`s and nesting are followed before giving up (cycles).
const MAX_DEPTH: u32 = 64;

/// Parses `content` as JSON (tolerating a Markdown code fence around it) and checks
/// it against `schema`. Returns the JSON text without the fence, or what is wrong.
pub fn check(content: &str, schema: &Value) -> Result<String, String> {
    let text = strip_fence(content);
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("the answer is not valid JSON: {e}"))?;
    validate(&value, schema).map_err(|e| format!("the answer does not match the schema: {e}"))?;
    Ok(text.to_owned())
}

/// Checks `value` against `schema`; the error names the first offending path.
pub fn validate(value: &Value, schema: &Value) -> Result<(), String> {
    Validator { root: schema }.check(value, schema, "$", 0)
}

/// `content` without a surrounding Markdown code fence (```` ```json ... ``` ````).
fn strip_fence(content: &str) -> &str {
    let t = content.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let Some(body) = rest.strip_suffix("```") else {
        return t;
    };
    // Drop the info string ("json") on the opening line.
    match body.split_once('\n') {
        Some((info, inner)) if !info.trim_start().starts_with(['{', '[']) => inner.trim(),
        _ => body.trim(),
    }
}

struct Validator<'a> {
    root: &'a Value,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(v: &Value, ty: &str) -> bool {
    let actual = type_name(v);
    actual == ty
        || (ty == "number" && actual == "integer")
        || (ty == "integer" && v.as_f64().is_some_and(|f| f.fract() == 0.0))
}

impl Validator<'_> {
    fn resolve<'s>(&'s self, schema: &'s Value) -> Result<&'s Value, String> {
        let Some(r) = schema.get("$ref").and_then(Value::as_str) else {
            return Ok(schema);
        };
        let pointer = r
            .strip_prefix('#')
            .ok_or_else(|| format!("unsupported schema reference {r}"))?;
        self.root
            .pointer(pointer)
            .ok_or_else(|| format!("unresolved schema reference {r}"))
    }

    fn check(&self, v: &Value, schema: &Value, path: &str, depth: u32) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("{path}: schema nesting too deep"));
        }
        let schema = self.resolve(schema)?;
        let Some(obj) = schema.as_object() else {
            // `true` or `{}`: anything goes; `false`: nothing does.
            return match schema {
                Value::Bool(false) => Err(format!("{path}: no value is allowed here")),
                _ => Ok(()),
            };
        };
        if let Some(ty) = obj.get("type") {
            let ok = match ty {
                Value::String(t) => type_matches(v, t),
                Value::Array(ts) => ts
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|t| type_matches(v, t)),
                _ => true,
            };
            if !ok {
                return Err(format!("{path}: expected {ty}, found {}", type_name(v)));
            }
        }
        if let Some(options) = obj.get("enum").and_then(Value::as_array)
            && !options.contains(v)
        {
            return Err(format!(
                "{path}: {v} is not one of {}",
                Value::from(options.clone())
            ));
        }
        if let Some(c) = obj.get("const")
            && c != v
        {
            return Err(format!("{path}: expected {c}, found {v}"));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = obj.get(key).and_then(Value::as_array)
                && !alts
                    .iter()
                    .any(|s| self.check(v, s, path, depth + 1).is_ok())
            {
                return Err(format!("{path}: matches none of the {key} alternatives"));
            }
        }
        if let Some(all) = obj.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.check(v, s, path, depth + 1)?;
            }
        }
        match v {
            Value::Object(map) => {
                if let Some(required) = obj.get("required").and_then(Value::as_array) {
                    for key in required.iter().filter_map(Value::as_str) {
                        if !map.contains_key(key) {
                            return Err(format!("{path}: missing required property `{key}`"));
                        }
                    }
                }
                let props = obj.get("properties").and_then(Value::as_object);
                for (key, value) in map {
                    let sub = format!("{path}.{key}");
                    match props.and_then(|p| p.get(key)) {
                        Some(s) => self.check(value, s, &sub, depth + 1)?,
                        None => match obj.get("additionalProperties") {
                            Some(Value::Bool(false)) => {
                                return Err(format!("{path}: unexpected property `{key}`"));
                            }
                            Some(s @ Value::Object(_)) => self.check(value, s, &sub, depth + 1)?,
                            _ => {}
                        },
                    }
                }
            }
            Value::Array(items) => {
                let len = items.len() as u64;
                if let Some(min) = obj.get("minItems").and_then(Value::as_u64)
                    && len < min
                {
                    return Err(format!("{path}: {len} items, at least {min} required"));
                }
                if let Some(max) = obj.get("maxItems").and_then(Value::as_u64)
                    && len > max
                {
                    return Err(format!("{path}: {len} items, at most {max} allowed"));
                }
                if let Some(item_schema) = obj.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item, item_schema, &format!("{path}[{i}]"), depth + 1)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan_schema() -> Value {
        json!({
            "type": "object",
            "required": ["subtasks"],
            "properties": {
                "subtasks": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Subtask"}}
            },
            "additionalProperties": false,
            "$defs": {
                "Subtask": {
                    "type": "object",
                    "required": ["role", "instruction"],
                    "properties": {
                        "role": {"type": "string"},
                        "instruction": {"type": "string"},
                        "note": {"type": ["string", "null"]}
                    }
                }
            }
        })
    }

    #[test]
    fn accepts_a_matching_value() {
        let v = json!({"subtasks": [{"role": "r", "instruction": "i", "note": null}]});
        assert_eq!(validate(&v, &plan_schema()), Ok(()));
    }

    #[test]
    fn names_what_is_wrong() {
        let s = plan_schema();
        let cases = [
            (json!([]), "$: expected \"object\", found array"),
            (json!({}), "$: missing required property `subtasks`"),
            (
                json!({"subtasks": []}),
                "$.subtasks: 0 items, at least 1 required",
            ),
            (
                json!({"subtasks": [{"role": 1, "instruction": "i"}]}),
                "$.subtasks[0].role: expected \"string\", found integer",
            ),
            (
                json!({"subtasks": [{"role": "r"}]}),
                "$.subtasks[0]: missing required property `instruction`",
            ),
            (
                json!({"subtasks": [{"role": "r", "instruction": "i"}], "x": 1}),
                "$: unexpected property `x`",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(validate(&v, &s), Err(want.to_owned()), "{v}");
        }
    }

    #[test]
    fn enums_alternatives_and_numbers() {
        let s = json!({"anyOf": [{"type": "integer"}, {"enum": ["a", "b"]}]});
        assert!(validate(&json!(3), &s).is_ok());
        assert!(validate(&json!("b"), &s).is_ok());
        assert!(validate(&json!("c"), &s).is_err());
        assert!(validate(&json!(2.5), &s).is_err());
        assert!(validate(&json!(2), &json!({"type": "number"})).is_ok());
        assert!(validate(&json!(1), &json!({"$ref": "#/$defs/Missing"})).is_err());
    }

    #[test]
    fn check_parses_and_strips_fences() {
        let s = json!({"type": "object", "required": ["summary"]});
        assert_eq!(
            check("```json\n{\"summary\": \"x\"}\n```", &s),
            Ok("{\"summary\": \"x\"}".to_owned())
        );
        assert_eq!(
            check(" {\"summary\": 1} ", &s),
            Ok("{\"summary\": 1}".to_owned())
        );
        let err = check("{\"summ", &s).unwrap_err();
        assert!(err.starts_with("the answer is not valid JSON"), "{err}");
        let err = check("{}", &s).unwrap_err();
        assert!(err.contains("missing required property `summary`"), "{err}");
    }
}
