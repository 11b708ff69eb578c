//! A local OTLP receiver that keeps the spans it is sent: for tests (which check the trace that
//! herald exports, decoded with the official protobuf definitions) and for `herald bench`
//! (which measures the cost of exporting). It answers OTLP/gRPC and OTLP/HTTP (protobuf) on
//! two loopback ports. Not a collector: it keeps everything in memory until dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use tokio::sync::watch;

/// One span as received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, `None` for a root span.
    pub parent_span_id: Option<String>,
    /// The span's name.
    pub name: String,
    /// `service.name` of the resource that sent it.
    pub service: Option<String>,
    /// OTLP's span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// OTLP's status code (0 unset, 1 ok, 2 error).
    pub status: i32,
    /// String, integer and boolean attributes, as text.
    pub attributes: BTreeMap<String, String>,
    /// Which protocol it came over: `grpc` or `http`.
    pub protocol: &'static str,
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
}

impl Received {
    fn take(&self, request: ExportTraceServiceRequest, protocol: &'static str) {
        let mut out = Vec::new();
        for rs in request.resource_spans {
            let service = rs.resource.as_ref().and_then(|r| {
                r.attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
            });
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(ReceivedSpan {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: (!s.parent_span_id.is_empty())
                            .then(|| hex(&s.parent_span_id)),
                        name: s.name,
                        service: service.clone(),
                        kind: s.kind,
                        status: s.status.map_or(0, |st| st.code),
                        attributes: s
                            .attributes
                            .iter()
                            .filter_map(|kv| {
                                Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?)?))
                            })
                            .collect(),
                        protocol,
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(out);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

struct Grpc(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_export(State(r): State<Arc<Received>>, body: Bytes) -> (StatusCode, Vec<u8>) {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            r.take(request, "http");
            let response = ExportTraceServiceResponse {
                partial_success: None,
            };
            (StatusCode::OK, response.encode_to_vec())
        }
        Err(_) => (StatusCode::BAD_REQUEST, Vec::new()),
    }
}

/// The running receiver; stops when dropped.
pub struct Sink {
    received: Arc<Received>,
    grpc: SocketAddr,
    http: SocketAddr,
    _stop: watch::Sender<bool>,
}

impl Sink {
    /// Starts both listeners on free loopback ports.
    pub async fn start() -> std::io::Result<Sink> {
        let received = Arc::new(Received::default());
        let (stop, rx) = watch::channel(false);
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (grpc, http) = (grpc_listener.local_addr()?, http_listener.local_addr()?);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        {
            let service = TraceServiceServer::new(Grpc(received.clone()));
            let rx = rx.clone();
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(grpc_listener),
                        until(rx),
                    )
                    .await;
            });
        }
        {
            let app = axum::Router::new()
                .route("/v1/traces", post(http_export))
                .with_state(received.clone());
            tokio::spawn(async move {
                let _ = axum::serve(http_listener, app)
                    .with_graceful_shutdown(until(rx))
                    .await;
            });
        }
        Ok(Sink {
            received,
            grpc,
            http,
            _stop: stop,
        })
    }

    /// `http://127.0.0.1:<port>` for `OTEL_EXPORTER_OTLP_ENDPOINT` with the `grpc` protocol.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `http://127.0.0.1:<port>` for `OTEL_EXPORTER_OTLP_ENDPOINT` with `http/protobuf` (the
    /// exporter appends `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `done` holds for the spans received, or `within` passes; returns the spans.
    pub async fn wait_for(
        &self,
        within: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
