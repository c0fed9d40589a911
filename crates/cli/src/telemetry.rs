//! Logging and OpenTelemetry export for the binary.
//!
//! The log goes to stderr, filtered by `RUST_LOG` or `log`. When an OTLP endpoint is
//! configured (`[telemetry] otlp_endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`)
//! spans are also exported, over http/protobuf or gRPC, with their parents taken from
//! the messages' `traceparent` headers (`flotilla_bus::trace`), so one session is one
//! trace across processes.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub(crate) enum OtlpProtocol {
    /// Protobuf over HTTP (`<endpoint>/v1/traces`, usually port 4318).
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// gRPC (usually port 4317).
    #[serde(rename = "grpc")]
    Grpc,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "http/protobuf" | "http" => Ok(Self::HttpProtobuf),
            "grpc" => Ok(Self::Grpc),
            other => anyhow::bail!(
                "unsupported OTLP protocol {other:?} (http/protobuf or grpc; http/json is not built in)"
            ),
        }
    }
}

/// `[telemetry]`: OpenTelemetry trace export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TelemetryConfig {
    /// The collector's base URL (as `OTEL_EXPORTER_OTLP_ENDPOINT`); none: no export.
    pub(crate) otlp_endpoint: Option<String>,
    /// Transport.
    pub(crate) otlp_protocol: OtlpProtocol,
    /// `service.name` of the exported spans (default: `flotilla-<command>`).
    pub(crate) service_name: Option<String>,
    /// Share of new traces (sessions without a sampled parent) that are exported;
    /// a session's later spans follow its first.
    pub(crate) sample_ratio: f64,
    /// Least level of the spans and events exported.
    pub(crate) level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            service_name: None,
            sample_ratio: 1.0,
            level: "info".into(),
        }
    }
}

impl TelemetryConfig {
    /// Applies the standard variables, which win over the file like `FLOTILLA_*` ones:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_SERVICE_NAME`.
    pub(crate) fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(e) = var("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|v| !v.trim().is_empty()) {
            self.otlp_endpoint = Some(e);
        }
        if let Some(p) = var("OTEL_EXPORTER_OTLP_PROTOCOL").filter(|v| !v.trim().is_empty()) {
            self.otlp_protocol = p.parse().context("OTEL_EXPORTER_OTLP_PROTOCOL")?;
        }
        if let Some(n) = var("OTEL_SERVICE_NAME").filter(|v| !v.trim().is_empty()) {
            self.service_name = Some(n);
        }
        Ok(())
    }
}

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("flotilla: flushing spans failed: {e}");
        }
    }
}

/// Installs the global subscriber: the stderr log filtered by `RUST_LOG` (or
/// `log_default`), and the OTLP exporter when `config` names an endpoint.
pub(crate) fn init(
    log_default: &str,
    config: &TelemetryConfig,
    default_service: &str,
) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(log_default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let Some(endpoint) = config.otlp_endpoint.as_deref() else {
        tracing_subscriber::registry().with(fmt).init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = match config.otlp_protocol {
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build(),
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
    }
    .with_context(|| format!("OTLP exporter for {endpoint}"))?;
    let service = config
        .service_name
        .clone()
        .unwrap_or_else(|| default_service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio.clamp(0.0, 1.0),
        ))))
        .with_resource(
            Resource::builder_empty()
                .with_service_name(service)
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build();
    let level: LevelFilter = config
        .level
        .parse()
        .with_context(|| format!("telemetry.level {:?}", config.level))?;
    let targets = Targets::new()
        .with_target("flotilla", level)
        .with_target("flotilla_bus", level)
        .with_target("flotilla_agent", level)
        .with_target("flotilla_control", level)
        .with_target("flotilla_llm", level);
    // Spans at `level`; of the log's events only warnings and errors become span
    // events (the rest stay in the log): the span events that matter (conflicts,
    // takeovers, budget stops) are added directly (`flotilla_bus::trace::span_event`).
    let targets = tracing_subscriber::filter::FilterExt::and(
        targets,
        tracing_subscriber::filter::filter_fn(|meta| {
            meta.is_span() || *meta.level() <= tracing::Level::WARN
        }),
    );
    // Span attributes are the fields Flotilla sets (session, role, task, agent, GenAI):
    // no thread, source location or busy/idle times on every span.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("flotilla"))
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        // Parents come from the tracing span tree (and the messages' traceparent), not
        // from a thread-local OpenTelemetry context attached at every poll of a span.
        .with_context_activation(false)
        .with_filter(targets);
    tracing_subscriber::registry().with(fmt).with(otel).init();
    tracing::info!(endpoint, protocol = ?config.otlp_protocol, "exporting spans over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_variables_win_over_the_file() {
        let mut c = TelemetryConfig {
            otlp_endpoint: Some("http://file:4318".into()),
            ..TelemetryConfig::default()
        };
        c.apply_env(|k| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://env:4317".into()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("grpc".into()),
            "OTEL_SERVICE_NAME" => Some("svc".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://env:4317"));
        assert_eq!(c.otlp_protocol, OtlpProtocol::Grpc);
        assert_eq!(c.service_name.as_deref(), Some("svc"));
        let mut c = TelemetryConfig::default();
        assert!(
            c.apply_env(|k| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "http/json".into()))
                .is_err(),
            "an unsupported protocol is refused, not ignored"
        );
        c.apply_env(|_| None).unwrap();
        assert_eq!(c, TelemetryConfig::default());
    }
}
