//! The JSON Schemas checked into `docs/schema/` must match the Rust types. To update
//! them after a deliberate protocol change: `FLOTILLA_BLESS=1 cargo test -p flotilla-protocol --test schema_drift`.

use std::path::Path;

#[test]
fn checked_in_schemas_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/schema");
    let bless = std::env::var_os("FLOTILLA_BLESS").is_some();
    let mut drifted = Vec::new();
    let generated = flotilla_protocol::schema::all();
    for (name, schema) in &generated {
        let path = dir.join(name);
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, schema).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == *schema => {}
            _ => drifted.push(name.to_string()),
        }
    }
    // No stale files either.
    if !bless {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            if name.ends_with(".json") && !generated.iter().any(|(n, _)| *n == name) {
                drifted.push(format!("{name} (no longer generated)"));
            }
        }
    }
    assert!(
        drifted.is_empty(),
        "docs/schema is out of date for {drifted:?}; if the protocol change is deliberate, run \
         `FLOTILLA_BLESS=1 cargo test -p flotilla-protocol --test schema_drift` and update docs/protocol.md"
    );
}

#[test]
fn schemas_describe_strict_versioned_messages() {
    for (name, schema) in flotilla_protocol::schema::all() {
        let v: serde_json::Value = serde_json::from_str(&schema).unwrap();
        assert!(v.get("$schema").is_some(), "{name}");
        if [
            "open_session.json",
            "event.json",
            "session_record.json",
            "task_record.json",
        ]
        .contains(&name)
        {
            assert_eq!(
                v["additionalProperties"],
                serde_json::json!(false),
                "{name} refuses unknown fields"
            );
            assert!(
                v["required"].as_array().unwrap().iter().any(|r| r == "v"),
                "{name} requires v"
            );
        }
    }
}
