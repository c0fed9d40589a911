//! An OTLP trace receiver for tests: `POST /v1/traces` (http/protobuf) and the gRPC
//! `TraceService`, both on random loopback ports, decoding with the
//! `opentelemetry-proto` types and keeping every span it is sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use prost::Message;

/// One received span, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// Trace id, 32 hex digits.
    pub trace_id: String,
    /// Span id, 16 hex digits.
    pub span_id: String,
    /// Parent span id, 16 hex digits, empty for a root.
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// Attributes, values rendered as strings.
    pub attributes: BTreeMap<String, String>,
    /// Names of its events, in order.
    pub events: Vec<String>,
    /// Start, nanoseconds since the epoch.
    pub start_unix_nanos: u64,
}

impl ReceivedSpan {
    /// An attribute's value.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// The receiver could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the OTLP receiver: {0}")]
pub struct ReceiverStartError(#[from] std::io::Error);

#[derive(Debug, Default)]
struct Spans(Mutex<Vec<ReceivedSpan>>);

impl Spans {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut out = Vec::new();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .map(render)
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(ReceivedSpan {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name,
                        service: service.clone(),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    kv.value.as_ref().map(render).unwrap_or_default(),
                                )
                            })
                            .collect(),
                        events: s.events.into_iter().map(|e| e.name).collect(),
                        start_unix_nanos: s.start_time_unix_nano,
                    });
                }
            }
        }
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(out);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn render(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

struct Grpc(Arc<Spans>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_traces(State(spans): State<Arc<Spans>>, body: Bytes) -> (StatusCode, Vec<u8>) {
    match ExportTraceServiceRequest::decode(body) {
        Ok(req) => {
            spans.add(req);
            (
                StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(_) => (StatusCode::BAD_REQUEST, Vec::new()),
    }
}

/// A running receiver; stops on drop.
#[derive(Debug)]
pub struct OtlpReceiver {
    http: SocketAddr,
    grpc: SocketAddr,
    spans: Arc<Spans>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Binds both transports on `127.0.0.1:0` and serves in tasks of the current runtime.
    pub async fn start() -> Result<Self, ReceiverStartError> {
        let spans = Arc::new(Spans::default());
        let http_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let grpc_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let (http, grpc) = (http_listener.local_addr()?, grpc_listener.local_addr()?);
        let app = Router::new()
            .route("/v1/traces", post(http_traces))
            .with_state(Arc::clone(&spans));
        let (tx_http, rx_http) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx_http.await;
                })
                .await;
        });
        let (tx_grpc, rx_grpc) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(Grpc(Arc::clone(&spans)));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(grpc_listener),
                    async move {
                        let _ = rx_grpc.await;
                    },
                )
                .await;
        });
        Ok(Self {
            http,
            grpc,
            spans,
            stop: vec![tx_http, tx_grpc],
        })
    }

    /// The base URL for http/protobuf (`OTEL_EXPORTER_OTLP_ENDPOINT`; the exporter
    /// appends `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The endpoint for gRPC.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many spans have been received.
    pub fn span_count(&self) -> usize {
        self.spans
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Waits until `done` holds for the spans received, or `timeout` passes; returns
    /// the spans either way.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        for tx in self.stop.drain(..) {
            let _ = tx.send(());
        }
    }
}
