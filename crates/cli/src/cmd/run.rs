//! `serve`, `agent` and `session`.

use std::sync::Arc;

use anyhow::Context;
use flotilla_agent::Worker;
use flotilla_bus::{Bus, Counters};
use flotilla_control::Serve;
use flotilla_llm::{LlmClient, SimulatedProvider};
use flotilla_protocol::{AgentId, Role, SessionId, SessionRecord, subject::keys};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Provider};

/// The configured LLM provider.
pub(crate) fn llm(config: &Config) -> anyhow::Result<Arc<dyn LlmClient>> {
    Ok(match config.llm.provider {
        Provider::Simulated => Arc::new(SimulatedProvider::new(config.llm.simulated.clone())),
        Provider::Openai => {
            let mut openai = config.llm.openai.clone();
            // The conventional variable, when the key is not configured.
            if openai.api_key.is_none() {
                openai.api_key = std::env::var("OPENAI_API_KEY")
                    .ok()
                    .filter(|k| !k.is_empty());
            }
            Arc::new(
                flotilla_llm::OpenAiClient::new(openai)
                    .context("configuring the OpenAI-compatible provider")?,
            )
        }
    })
}

fn process_name(kind: &str) -> String {
    format!("flotilla-{kind}-{}", std::process::id())
}

pub(crate) async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Patient: a cluster that is still electing its leaders does not answer at first.
    let Some(bus) = Bus::connect_patiently(
        &config.nats,
        &process_name("serve"),
        Arc::new(Counters::default()),
        &shutdown,
    )
    .await
    .context("connecting to NATS")?
    else {
        return Ok(());
    };
    tracing::info!(url = %config.nats.url, prefix = bus.names().prefix(), "connected");
    Serve::new(bus, llm(&config)?, config.control())
        .run(shutdown)
        .await?;
    Ok(())
}

pub(crate) async fn agent(
    config: Config,
    role: Role,
    concurrency: Option<usize>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !role.is_orchestrator(),
        "the orchestrator role is served by `flotilla serve`"
    );
    anyhow::ensure!(
        config.session.roles.contains(&role),
        "role {role} is not in session.roles ({})",
        config.role_list()
    );
    // An agent may start before `serve`, and may not be allowed to create the
    // topology: it waits for it.
    let Some(bus) = Bus::connect_patiently(
        &config.nats,
        &process_name(&format!("agent-{role}")),
        Arc::new(Counters::default()),
        &shutdown,
    )
    .await
    .context("connecting to NATS")?
    else {
        return Ok(());
    };
    let limited = flotilla_agent::LimitedLlm::wrap(llm(&config)?, &bus, &config.limits);
    let def = config.roles.get(&role).cloned().unwrap_or_default();
    let gateway = flotilla_agent::ToolGateway::new(bus.clone(), config.tools.clone())
        .context("invalid [tools] configuration")?;
    let agent = Arc::new(def.agent(
        &role,
        &config.llm.worker_model,
        limited,
        &config.budgets,
        &bus,
        &gateway,
    ));
    let mut settings = config.pool(&role);
    if let Some(c) = concurrency {
        settings.concurrency = c;
    }
    // The holder id in task records names the process: `<role>-<pid>`.
    let id = AgentId::parse(format!("{role}-{}", std::process::id()))?;
    Worker::new(bus, role, agent, settings)
        .with_agent_id(id)
        .with_liveness(config.liveness.clone())
        .run(shutdown)
        .await?;
    Ok(())
}

pub(crate) async fn session(config: Config, session: SessionId) -> anyhow::Result<()> {
    let bus = Bus::connect(
        &config.nats,
        &process_name("cli"),
        Arc::new(Counters::default()),
    )
    .await
    .context("connecting to NATS")?;
    match bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&session))
        .await?
    {
        Some((rec, rev)) => {
            println!("{}", serde_json::to_string_pretty(&rec)?);
            eprintln!("(revision {rev})");
            Ok(())
        }
        None => anyhow::bail!("no session {session}"),
    }
}
