//! The operator's requests to the Kubernetes API server, counted by resource,
//! verb and status class: a tower layer on the kube client's service stack
//! (kube-rs exports no client metrics of its own).

use crate::metrics::{status_class, Labels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Resources the operator reads or writes; anything else counts as `other`.
const RESOURCES: [&str; 8] = [
    "matrixusers",
    "matrixrooms",
    "roompermissions",
    "leases",
    "events",
    "namespaces",
    "secrets",
    "customresourcedefinitions",
];

#[derive(Debug, Default)]
pub struct KubeRequestStats {
    requests: Family<Labels, Counter>,
}

impl KubeRequestStats {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "openmeet_kube_requests",
            "Requests to the Kubernetes API server, by resource (with /status), verb and status class",
            self.requests.clone(),
        );
    }

    fn record(&self, resource: String, verb: &'static str, status: String) {
        self.requests
            .get_or_create(&vec![
                ("resource", resource),
                ("verb", verb.to_string()),
                ("status", status),
            ])
            .inc();
    }
}

/// Pure: a request's resource (a closed set, `/status` kept) and verb, as
/// the API server's audit names them.
pub fn classify(method: &http::Method, uri: &http::Uri, apply: bool) -> (String, &'static str) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/<group>/<version>/...; then namespaces/<ns>/ maybe.
    let mut rest: &[&str] = match segments.first() {
        Some(&"api") => segments.get(2..).unwrap_or_default(),
        Some(&"apis") => segments.get(3..).unwrap_or_default(),
        _ => &[],
    };
    if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        rest = &rest[2..];
    }
    let plural = rest.first().copied().unwrap_or("");
    let named = rest.len() > 1;
    let status = rest.get(2) == Some(&"status");
    let resource = match RESOURCES.iter().find(|r| **r == plural) {
        Some(r) if status => format!("{r}/status"),
        Some(r) => r.to_string(),
        None => "other".to_string(),
    };
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH if apply => "apply",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    (resource, verb)
}

/// Wraps the kube client's service so every request is counted.
#[derive(Clone)]
pub struct CountLayer(pub Arc<KubeRequestStats>);

impl<S> tower::Layer<S> for CountLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            stats: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    stats: Arc<KubeRequestStats>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let apply = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/apply-patch+yaml");
        let (resource, verb) = classify(request.method(), request.uri(), apply);
        let stats = self.stats.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            let status = match &result {
                Ok(response) => status_class(Some(response.status().as_u16())),
                Err(_) => status_class(None),
            };
            stats.record(resource, verb, status);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(method: http::Method, uri: &str, apply: bool) -> (String, &'static str) {
        classify(&method, &uri.parse().unwrap(), apply)
    }

    #[test]
    fn requests_are_named_by_resource_and_verb() {
        use http::Method;
        let g = "/apis/matrix.openmeet.net/v1alpha1";
        assert_eq!(
            of(
                Method::GET,
                &format!("{g}/matrixusers?watch=true&resourceVersion=1"),
                false
            ),
            ("matrixusers".into(), "watch")
        );
        assert_eq!(
            of(Method::GET, &format!("{g}/matrixrooms"), false),
            ("matrixrooms".into(), "list")
        );
        assert_eq!(
            of(
                Method::PATCH,
                &format!("{g}/namespaces/t/matrixrooms/r/status?fieldManager=x"),
                true
            ),
            ("matrixrooms/status".into(), "apply")
        );
        assert_eq!(
            of(
                Method::GET,
                "/apis/coordination.k8s.io/v1/namespaces/ops/leases/l",
                false
            ),
            ("leases".into(), "get")
        );
        assert_eq!(
            of(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/t/events",
                false
            ),
            ("events".into(), "create")
        );
        assert_eq!(
            of(Method::GET, "/api/v1/namespaces/t/secrets/s", false),
            ("secrets".into(), "get")
        );
        assert_eq!(
            of(Method::GET, "/api/v1/namespaces", false),
            ("namespaces".into(), "list")
        );
        assert_eq!(
            of(Method::GET, "/api/v1/pods", false),
            ("other".into(), "list")
        );
        assert_eq!(
            of(Method::DELETE, "/version", false),
            ("other".into(), "delete")
        );
    }
}
