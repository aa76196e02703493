//! A scripted API server for reconcile-level unit tests, in the manner of
//! controller-rs's `ApiServerVerifier`: a `kube::Client` whose requests are
//! answered by the test's own function and recorded, so a test can assert
//! on exactly what a reconcile sent (and that it sent nothing). Integration
//! tests stay on the real stack; these pin the exchange itself.

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the API server received it.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// The query's pairs, decoded.
    pub query: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
}

impl Exchange {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a server-side apply under the operator's field manager,
    /// forced (the operator owns what it applies).
    pub fn assert_forced_apply(&self) {
        assert_eq!(self.method, Method::PATCH, "{self:?}");
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "{self:?}"
        );
        assert_eq!(
            self.query("fieldManager"),
            Some(crate::api::FIELD_MANAGER),
            "{self:?}"
        );
        assert_eq!(self.query("force"), Some("true"), "{self:?}");
    }
}

type Answer = dyn Fn(&Exchange) -> (StatusCode, Value) + Send + Sync;

/// The requests received so far.
#[derive(Clone, Default)]
pub struct Recorded(Arc<Mutex<Vec<Exchange>>>);

impl Recorded {
    /// Waits until at least `count` requests arrived (the operator publishes
    /// Events from spawned tasks), then lets spawned work run a little
    /// longer and returns exactly what arrived: more than `count` fails.
    pub async fn expect(&self, count: usize) -> Vec<Exchange> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.len() < count && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        settle().await;
        let seen = self.0.lock().unwrap().clone();
        assert_eq!(seen.len(), count, "requests: {seen:#?}");
        seen
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Lets spawned tasks (Event publication) run to their first request.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// A client whose every request `answer` replies to.
pub fn client(
    answer: impl Fn(&Exchange) -> (StatusCode, Value) + Send + Sync + 'static,
) -> (Client, Recorded) {
    gated_client(answer, None)
}

/// A client whose requests are recorded on arrival and answered only as
/// `gate` hands out permits (every request at once without one): what is
/// recorded while the gate stays shut is what was sent concurrently.
pub fn gated_client(
    answer: impl Fn(&Exchange) -> (StatusCode, Value) + Send + Sync + 'static,
    gate: Option<Arc<tokio::sync::Semaphore>>,
) -> (Client, Recorded) {
    let answer: Arc<Answer> = Arc::new(answer);
    let recorded = Recorded::default();
    let log = recorded.clone();
    let service = tower::service_fn(move |request: Request<Body>| {
        let (answer, log, gate) = (answer.clone(), log.clone(), gate.clone());
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let exchange = Exchange {
                method: parts.method,
                path: parts.uri.path().to_string(),
                query: parts
                    .uri
                    .query()
                    .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
                    .unwrap_or_default(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (status, reply) = answer(&exchange);
            log.0.lock().unwrap().push(exchange);
            if let Some(gate) = gate {
                gate.acquire().await.expect("gate open").forget();
            }
            let response = Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    (Client::new(service, "default"), recorded)
}

/// Echoes what was sent: how the API server answers a create.
pub fn echo(exchange: &Exchange) -> (StatusCode, Value) {
    (StatusCode::OK, exchange.body.clone())
}

/// The stored object after a write, at a new resourceVersion.
pub fn stored(object: &impl serde::Serialize, resource_version: &str) -> (StatusCode, Value) {
    let mut object = serde_json::to_value(object).unwrap();
    object["metadata"]["resourceVersion"] = json!(resource_version);
    (StatusCode::OK, object)
}

/// The API server's 404 for an object that is gone.
pub fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// Fails any request: for reconciles that must not reach the API server.
pub fn refuse(exchange: &Exchange) -> (StatusCode, Value) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500,
               "message": format!("unexpected {} {}", exchange.method, exchange.path)}),
    )
}

/// A Synapse client pointed where nothing listens: a reconcile that must
/// stop before Synapse fails if it reaches it, and its stats show the try.
pub fn unreachable_synapse() -> crate::synapse::SynapseClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::synapse::SynapseClient::new(crate::synapse::SynapseConfig {
        url: "http://127.0.0.1:9".into(),
        server_name: "example.test".into(),
        admin_localpart: "operator".into(),
        as_token: "token".into(),
        timeout: Duration::from_secs(1),
    })
    .unwrap()
}

/// The operator's settings as the tests' reconciles run with them.
pub fn config() -> super::OperatorConfig {
    super::OperatorConfig {
        sso_idp_id: "openmeet".into(),
        reserved_localparts: super::OperatorConfig::builtin_reserved("operator", "sender"),
        adopt_namespaces: Default::default(),
        admin_namespaces: Default::default(),
        resync_interval: Duration::from_secs(300),
        sweep_period: Duration::from_secs(6 * 3600),
        sweep_budget: 1.0,
        namespace: None,
        label_selector: None,
        instance: None,
        alias_prefix: "om_".into(),
        concurrency: 1,
        room_version: "12".into(),
        credential_token_lifetime: Duration::from_secs(3600),
    }
}

/// An Event recorder writing through `client`.
pub fn recorder(client: Client) -> super::events::Recorder {
    let reporter = kube::runtime::events::Reporter {
        controller: "test".into(),
        instance: None,
    };
    super::events::Recorder::new(client, reporter)
}

/// Answers Event writes with what was sent and status applies with
/// `object(name)` stored at a new version.
pub fn status_server(
    object: impl Fn(&str) -> Value + Send + Sync + 'static,
) -> impl Fn(&Exchange) -> (StatusCode, Value) + Send + Sync + 'static {
    move |x| {
        if x.path.contains("/events") {
            return echo(x);
        }
        match x
            .path
            .strip_suffix("/status")
            .and_then(|p| p.rsplit('/').next())
        {
            Some(name) => stored(&object(name), "100"),
            None => refuse(x),
        }
    }
}

/// The Ready condition of a written status.
pub fn ready_of(status: &Value) -> &Value {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == crate::api::conditions::READY)
        .expect("a Ready condition")
}

/// The status body of the one status write for `name`.
pub fn status_written(sent: &[Exchange], name: &str) -> Value {
    let write = sent
        .iter()
        .find(|x| x.path.ends_with(&format!("/{name}/status")))
        .unwrap_or_else(|| panic!("no status write for {name}: {sent:#?}"));
    write.assert_forced_apply();
    write.body["status"].clone()
}
