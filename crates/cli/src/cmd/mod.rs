//! One function per subcommand.

mod dlq;
pub(crate) mod flood;
pub(crate) mod limits_bench;
mod load;
pub(crate) mod memory_bench;
mod run;
mod submit;
pub(crate) mod views;

pub(crate) use dlq::dlq;
pub(crate) use load::load;
pub(crate) use run::{agent, serve, session};
pub(crate) use submit::{answer, cancel, submit};

/// Installs the Prometheus exporter, serving `GET http://<addr>/metrics`, when an
/// address is given.
pub(crate) fn serve_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    use anyhow::Context;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let Some(addr) = addr else {
        return Ok(());
    };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ],
        )
        .context("metrics histogram buckets")?
        .install()
        .with_context(|| format!("serving metrics on {addr}"))?;
    flotilla_bus::metrics::describe_all();
    tracing::info!(%addr, "prometheus metrics at /metrics");
    Ok(())
}
