//! The Helm chart (`charts/openmeet-matrix-operator`): it lints, its schema
//! refuses wrong values, what it renders is accepted by the real API server,
//! its CRDs are the generated ones, and the shipped binaries, configured as
//! its Deployments configure them, work under exactly the RBAC it grants,
//! each under its own ServiceAccount.

use crate::harness::{free_port, https_client, unique, wait_for, Options, Stack, TestEnv, LABEL};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, PostParams};
use kube::Api;
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, RoomPermission};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub(crate) const ROOT: &str = env!("CARGO_MANIFEST_DIR");
pub(crate) const CHART: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/openmeet-matrix-operator"
);
pub(crate) const CI_VALUES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/openmeet-matrix-operator/ci/test-values.yaml"
);
/// The kinds the controller's and the sidecar's permissions are made of.
const RBAC_KINDS: [&str; 5] = [
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

/// The pinned helm, built once (cached by version) by `tests/stack/build-helm.sh`.
pub(crate) fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new("bash")
            .arg(format!("{ROOT}/tests/stack/build-helm.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running tests/stack/build-helm.sh");
        assert!(out.status.success(), "tests/stack/build-helm.sh failed");
        let bin = String::from_utf8(out.stdout).expect("bin dir");
        PathBuf::from(bin.trim()).join("helm")
    })
}

/// A scratch directory for one test's files.
pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `helm template` of the chart with its CI values and `overrides` on top,
/// CRDs left out (the stack installed them). `Err(stderr)` when helm refuses.
fn template(dir: &Path, release: &str, ns: &str, overrides: &Value) -> Result<String, String> {
    let file = dir.join(format!("{}.yaml", unique("values")));
    std::fs::write(&file, serde_yaml::to_string(overrides).unwrap()).unwrap();
    let out = Command::new(helm())
        .args(["template", release, CHART, "--namespace", ns])
        .args(["--set", "crds.install=false"])
        .args(["-f", CI_VALUES, "-f"])
        .arg(&file)
        .output()
        .expect("running helm template");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The documents of a multi-document YAML stream.
fn documents(manifest: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(manifest)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn to_yaml_stream(docs: &[&Value]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The Deployment of one component (`controller`, `sidecar`).
fn deployment<'a>(docs: &'a [Value], component: &str) -> &'a Value {
    of_kind(docs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == component)
        .unwrap_or_else(|| panic!("no {component} Deployment"))
}

/// Creates the namespaces a manifest declares (for real: a dry run of a
/// Role in a namespace that does not exist yet is refused).
async fn create_namespaces(docs: &[Value]) {
    let namespaces: Vec<&Value> = of_kind(docs, "Namespace");
    if namespaces.is_empty() {
        return;
    }
    let (ok, out) = kubectl(
        Stack::get().var("KUBECONFIG"),
        &[
            "apply",
            "--server-side",
            "--field-manager=chart-test",
            "-f",
            "-",
        ],
        Some(to_yaml_stream(&namespaces)),
    )
    .await;
    assert!(ok, "creating the chart's namespaces: {out}");
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} container"))
}

/// `kubectl` against the stack (as `kubeconfig`), `stdin` piped in.
pub(crate) async fn kubectl(
    kubeconfig: &str,
    args: &[&str],
    stdin: Option<String>,
) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(Stack::get().var("KUBECTL"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .await
        .unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn chart_lints_renders_and_applies_with_server_side_dry_run() {
    let stack = Stack::get();
    let env = TestEnv::with(
        "chart-dry",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let ns = env.ns(0);
    let dir = scratch("chart-dry");

    let lint = Command::new(helm())
        .args(["lint", "--strict", CHART, "-f", CI_VALUES])
        .output()
        .expect("running helm lint");
    assert!(
        lint.status.success(),
        "helm lint --strict: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // The default shape, the namespaced one, and the namespaced one without
    // the sidecar.
    let variants = [
        (
            json!({}),
            vec![
                "ClusterRole",
                "ConfigMap",
                "PodDisruptionBudget",
                "Namespace",
            ],
            vec![],
            2,
        ),
        (
            json!({"watchNamespace": ns}),
            vec!["Role", "ClusterRole", "ConfigMap", "Namespace"],
            vec![],
            2,
        ),
        // MAS mode: the same objects, MAS's settings added.
        (
            mas_values(),
            vec![
                "ClusterRole",
                "ConfigMap",
                "PodDisruptionBudget",
                "Namespace",
            ],
            vec![],
            2,
        ),
        (
            json!({"watchNamespace": ns, "sidecar": {"enabled": false}, "replicas": 1}),
            // Namespaces are cluster-scoped: the controller reads tenant labels.
            vec!["Role", "ClusterRole"],
            vec!["ConfigMap", "PodDisruptionBudget", "Namespace"],
            1,
        ),
    ];
    for (overrides, expected, absent, deployments) in variants {
        let release = unique("dry");
        let manifest = template(&dir, &release, ns, &overrides).expect("helm template");
        let docs = documents(&manifest);
        let mut kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        kinds.sort();
        // One Deployment and one ServiceAccount per component.
        for kind in ["Deployment", "ServiceAccount"] {
            let count = kinds.iter().filter(|k| **k == kind).count();
            assert_eq!(count, deployments, "{kind}s in {kinds:?} for {overrides}");
        }
        for kind in ["Deployment", "Service", "ServiceAccount", "RoleBinding"]
            .into_iter()
            .chain(expected)
        {
            assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
        }
        for kind in absent {
            assert!(
                !kinds.contains(&kind),
                "{kind} in {kinds:?} for {overrides}"
            );
        }
        if overrides.get("watchNamespace").is_some() {
            // Scoped to one namespace, the binaries' cluster-wide grant is
            // namespaces only (the platform's roles are platform_roles_*).
            for cluster_role in of_kind(&docs, "ClusterRole").into_iter().filter(|r| {
                let component = &r["metadata"]["labels"]["app.kubernetes.io/component"];
                component == "controller" || component == "sidecar"
            }) {
                assert_eq!(
                    cluster_role["rules"],
                    json!([{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}])
                );
            }
        }
        create_namespaces(&docs).await;
        let (ok, out) = kubectl(
            stack.var("KUBECONFIG"),
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=chart-test",
                "-f",
                "-",
            ],
            Some(manifest),
        )
        .await;
        assert!(ok, "server-side dry run refused {overrides}: {out}");
        let applied = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(applied, docs.len(), "every object accepted: {out}");
    }

    // The schema refuses wrong values before anything reaches the cluster.
    let wrong = template(&dir, "bad", ns, &json!({"replicas": "two"})).unwrap_err();
    assert!(
        wrong.contains("/replicas") && wrong.contains("integer"),
        "{wrong}"
    );
    let missing = template(&dir, "bad", ns, &json!({"synapse": {"url": null}})).unwrap_err();
    assert!(
        missing.contains("/synapse") && missing.contains("url"),
        "{missing}"
    );
    // MAS mode needs MAS's URL, the client, its Secret and the provider.
    let no_mas = template(&dir, "bad", ns, &json!({"auth": {"mode": "mas"}})).unwrap_err();
    assert!(no_mas.contains("/auth"), "{no_mas}");
    // And hands them to both binaries.
    let manifest = template(&dir, "mas", ns, &mas_values()).expect("helm template");
    let docs = documents(&manifest);
    let controller = of_kind(&docs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
        .expect("controller Deployment");
    let env_of = |name: &str| {
        controller["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(env_of("MATRIX_AUTH"), Some(json!("mas")));
    assert_eq!(env_of("MAS_UPSTREAM_PROVIDER"), Some(json!(MAS_PROVIDER)));
    assert_eq!(
        env_of("MAS_CLIENT_SECRET_FILE"),
        Some(json!("/var/run/secrets/openmeet/mas/client_secret"))
    );
    let sidecar_config = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find_map(|c| c["data"]["sidecar.yaml"].as_str().map(str::to_string))
        .expect("sidecar ConfigMap");
    let config: Value = serde_yaml::from_str(&sidecar_config).unwrap();
    assert_eq!(config["mas"]["clientId"], json!(MAS_CLIENT));
    let unknown = template(&dir, "bad", ns, &json!({"controler": {}})).unwrap_err();
    assert!(unknown.contains("controler"), "{unknown}");
    // The sidecar's records never share the leader Lease's namespace.
    let shared = template(
        &dir,
        "bad",
        ns,
        &json!({"sidecar": {"stateNamespace": {"name": ns}}}),
    )
    .unwrap_err();
    assert!(shared.contains("stateNamespace"), "{shared}");
    let _ = std::fs::remove_dir_all(dir);
}

const MAS_CLIENT: &str = "01JC8ZQ3V6N4T2H7K9D5RWXY0A";
const MAS_PROVIDER: &str = "01JC8ZQ3V6N4T2H7K9D5RWXY0B";

/// Chart values for MAS mode.
fn mas_values() -> Value {
    json!({"auth": {"mode": "mas", "mas": {
        "url": "http://mas.matrix.svc:8080", "clientId": MAS_CLIENT,
        "existingSecret": "mas-client", "upstreamProviderId": MAS_PROVIDER}}})
}

#[test]
fn chart_crds_match_the_generated_ones() {
    let generated = std::fs::read(format!("{ROOT}/crds/crds.yaml")).unwrap();
    let shipped = std::fs::read(format!("{CHART}/files/crds.yaml")).unwrap();
    assert!(
        generated == shipped,
        "charts/openmeet-matrix-operator/files/crds.yaml differs from crds/crds.yaml: \
         run 'make crds'"
    );
}

/// One version for the crate, the image (`appVersion`), the chart and the
/// kit, with its entry in the changelog: `helm history` and `npm` tell
/// releases apart the same way.
#[test]
fn versions_move_together() {
    let crate_version = env!("CARGO_PKG_VERSION");
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{CHART}/Chart.yaml")).unwrap())
            .unwrap();
    let kit: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/clients/typescript/package.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        chart["version"].as_str(),
        Some(crate_version),
        "Chart.yaml version"
    );
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(crate_version),
        "Chart.yaml appVersion"
    );
    assert_eq!(
        kit["version"].as_str(),
        Some(crate_version),
        "the kit's package.json"
    );
    let changelog = std::fs::read_to_string(format!("{ROOT}/CHANGELOG.md")).unwrap();
    assert!(
        changelog.contains(&format!("## [{crate_version}] - ")),
        "CHANGELOG.md has no entry for {crate_version}"
    );
}

/// Deletes a release's cluster-scoped objects (there is no garbage collector).
struct ClusterScoped(Vec<(String, String)>);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let stack = Stack::get();
        for (kind, name) in &self.0 {
            let _ = Command::new(stack.var("KUBECTL"))
                .args(["delete", kind, name, "--ignore-not-found", "--wait=false"])
                .env("KUBECONFIG", stack.var("KUBECONFIG"))
                .output();
        }
    }
}

/// The stack's kubeconfig, acting as `user` in `groups` (impersonation).
fn impersonating(dir: &Path, user: &str, groups: &[String]) -> String {
    let stack = Stack::get();
    let text = std::fs::read_to_string(stack.var("KUBECONFIG")).unwrap();
    let mut config: Value = serde_yaml::from_str(&text).unwrap();
    for entry in config["users"].as_array_mut().expect("users") {
        entry["user"]["as"] = json!(user);
        entry["user"]["as-groups"] = json!(groups);
    }
    let path = dir.join(format!("kubeconfig-as-{}", user.replace(':', "-")));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path.display().to_string()
}

/// The plain environment values of a rendered container (downward-API ones
/// are the caller's to supply).
fn plain_env(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
        .collect()
}

/// The downward-API environment values of a rendered container, as the
/// kubelet would fill them in for pod `pod` in namespace `ns`: only those
/// the container declares.
fn downward_env(container: &Value, pod: &str, ns: &str) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let field = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
            let value = match field {
                "metadata.name" => pod,
                "metadata.namespace" => ns,
                other => panic!("unexpected downward-API field {other}"),
            };
            Some((e["name"].as_str()?.to_string(), value.to_string()))
        })
        .collect()
}

/// The ServiceAccount a rendered Deployment's pods run as.
fn service_account(deployment: &Value) -> String {
    deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName")
        .to_string()
}

#[tokio::test]
async fn controller_works_under_exactly_the_charts_rbac() {
    let stack = Stack::get();
    let env = TestEnv::with(
        "chart-rbac",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let ns = env.ns(0).to_string();
    let dir = scratch("chart-rbac");
    let release = unique("rbac");
    // Kept when the test fails: the binaries' logs are there.
    eprintln!("chart-rbac files and logs in {}", dir.display());
    let sidecar_port = free_port();
    let sidecar_url = format!("https://127.0.0.1:{sidecar_port}");
    let manifest = template(
        &dir,
        &release,
        &ns,
        &json!({
            "synapse": {
                "url": stack.var("SYNAPSE_URL"),
                "serverName": stack.var("MATRIX_SERVER_NAME"),
                "adminLocalpart": stack.var("MATRIX_ADMIN_LOCALPART"),
            },
            "watchSelector": format!("{LABEL}={}", env.run_id),
            "controller": {"idpId": stack.var("OIDC_IDP_ID")},
            "sidecar": {
                "issuer": sidecar_url,
                "client": {"redirectUris": [format!("{}/_synapse/client/oidc/callback", stack.var("SYNAPSE_URL"))]},
                "platform": {"issuer": stack.var("PLATFORM_ISSUER"), "audience": stack.var("PLATFORM_AUDIENCE")},
            },
        }),
    )
    .expect("helm template");
    let docs = documents(&manifest);
    let controller_deployment = deployment(&docs, "controller");
    let sidecar_deployment = deployment(&docs, "sidecar");
    let account = service_account(controller_deployment);
    let sidecar_account = service_account(sidecar_deployment);
    assert_ne!(account, sidecar_account, "the sidecar has its own account");
    for name in [&account, &sidecar_account] {
        assert!(
            of_kind(&docs, "ServiceAccount")
                .iter()
                .any(|a| a["metadata"]["name"] == name.as_str()),
            "the chart creates {name}"
        );
    }

    // The chart's permissions, for real; nothing else is granted to the
    // accounts. The sidecar's records have a namespace of their own.
    create_namespaces(&docs).await;
    let rbac: Vec<&Value> = docs
        .iter()
        .filter(|d| RBAC_KINDS.iter().any(|k| d["kind"] == *k))
        .collect();
    let _cleanup = ClusterScoped(
        rbac.iter()
            .chain(of_kind(&docs, "Namespace").iter())
            .filter(|d| {
                let kind = d["kind"].as_str().unwrap();
                kind.starts_with("Cluster") || kind == "Namespace"
            })
            .map(|d| {
                (
                    d["kind"].as_str().unwrap().to_string(),
                    d["metadata"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
    );
    let (ok, out) = kubectl(
        stack.var("KUBECONFIG"),
        &[
            "apply",
            "--server-side",
            "--field-manager=chart-test",
            "-f",
            "-",
        ],
        Some(to_yaml_stream(&rbac)),
    )
    .await;
    assert!(ok, "applying the chart's RBAC: {out}");

    // The registration's tokens, under the name the chart points the controller at.
    let controller_env = plain_env(container(controller_deployment, "controller"));
    let lookup = |key: &str| {
        controller_env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the chart sets no {key}"))
    };
    let as_token_secret = lookup("AS_TOKEN_SECRET");
    let (secret_ns, secret_name) = as_token_secret.split_once('/').unwrap();
    assert_eq!(secret_ns, ns, "the Secret lives in the release namespace");
    let source = Api::<Secret>::namespaced(env.client.clone(), "openmeet-system")
        .get("matrix-appservice")
        .await
        .expect("the stack's appservice Secret");
    let copy: Secret = serde_json::from_value(json!({
        "metadata": {"name": secret_name, "namespace": ns},
        "data": {
            "as_token": source.data.as_ref().unwrap()["as_token"],
            "hs_token": source.data.as_ref().unwrap()["hs_token"],
        },
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &ns)
        .create(&PostParams::default(), &copy)
        .await
        .expect("copy the appservice Secret");

    // Act as the ServiceAccounts. The stack's admin (system:masters) may.
    let as_account = |name: &str| {
        impersonating(
            &dir,
            &format!("system:serviceaccount:{ns}:{name}"),
            &[
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
        )
    };
    let kubeconfig = as_account(&account);
    let sidecar_kubeconfig = as_account(&sidecar_account);
    let (allowed, out) = kubectl(
        &kubeconfig,
        &["-n", &ns, "get", "secret", secret_name, "-o", "name"],
        None,
    )
    .await;
    assert!(allowed, "the account reads its Secret: {out}");
    let (allowed, out) = kubectl(
        &kubeconfig,
        &[
            "-n",
            "openmeet-system",
            "get",
            "secret",
            "matrix-appservice",
        ],
        None,
    )
    .await;
    assert!(
        !allowed && out.contains("Forbidden"),
        "impersonation in effect: {out}"
    );

    // The controller, configured as the chart's Deployment configures it.
    let metrics_port = free_port();
    let lease_name = lookup("LEASE_NAME");
    let pod_name = format!("{release}-controller");
    assert_eq!(lookup("LEADER_ELECT"), "true");
    let args: Vec<String> =
        serde_json::from_value(container(controller_deployment, "controller")["args"].clone())
            .unwrap();
    let log = dir.join("controller.log");
    let _controller = tokio::process::Command::new(env!("CARGO_BIN_EXE_openmeet-matrix-operator"))
        .args(&args)
        .env_clear()
        .envs(controller_env.iter().cloned())
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", &pod_name)
        .env("POD_NAMESPACE", &ns)
        // The test process serves the appservice feed (see `serve_appservice`).
        .env("APPSERVICE_LISTEN", "off")
        .env("METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the controller binary");
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();

    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
    wait_for("the controller to hold the chart's Lease", || async {
        let lease = leases.get_opt(&lease_name).await.ok()??;
        (lease.spec?.holder_identity? == pod_name).then_some(())
    })
    .await;
    let http = reqwest::Client::new();
    wait_for("the controller's /readyz", || async {
        let url = format!("http://127.0.0.1:{metrics_port}/readyz");
        let r = http.get(url).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    let localpart = unique("chart-ann");
    let subject = unique("chart-subject");
    env.create::<MatrixUser>(
        0,
        "ann",
        json!({"localpart": localpart, "displayName": "Ann", "subject": subject}),
    )
    .await;
    env.create::<MatrixRoom>(
        0,
        "hall",
        json!({"alias": unique("chart-hall"), "name": "Hall"}),
    )
    .await;
    env.create::<RoomPermission>(
        0,
        "hall-ann",
        json!({"roomRef": {"name": "hall"}, "userRef": {"name": "ann"}, "role": "Moderator"}),
    )
    .await;
    env.wait_condition::<MatrixUser>(0, "ann", true, "Converged")
        .await;
    let room: MatrixRoom = env.wait_condition(0, "hall", true, "Converged").await;
    let perm: RoomPermission = env.wait_condition(0, "hall-ann", true, "Converged").await;
    assert_eq!(
        room.status.unwrap().joined_members,
        Some(2),
        "operator, ann"
    );
    assert_eq!(perm.status.unwrap().effective_power_level, Some(50));
    // Events were recorded too (their create/patch is granted).
    wait_for("an Event about the room", || async {
        (!env.event_reasons(0, "hall").await.is_empty()).then_some(())
    })
    .await;
    assert!(
        !logged().to_lowercase().contains("forbidden"),
        "no request was refused:\n{}",
        logged()
    );

    // The sidecar, with the chart's own configuration file: only the mounted
    // paths are swapped for the stack's files.
    let sidecar = container(sidecar_deployment, "sidecar");
    let config_map = of_kind(&docs, "ConfigMap")[0];
    let mut config: Value =
        serde_yaml::from_str(config_map["data"]["sidecar.yaml"].as_str().unwrap()).unwrap();
    let mounts: Vec<String> = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_string())
        .collect();
    let stack_config: Value =
        serde_yaml::from_str(&std::fs::read_to_string(stack.var("SIDECAR_CONFIG")).unwrap())
            .unwrap();
    let swaps = [
        ("/tls/certFile", stack.var("SIDECAR_CERT").to_string()),
        ("/tls/keyFile", stack.var("SIDECAR_KEY").to_string()),
        (
            "/signingKeys/dir",
            stack_config["signingKeys"]["dir"].as_str().unwrap().into(),
        ),
        (
            "/clients/0/secretFile",
            stack.var("OIDC_CLIENT_SECRET_FILE").into(),
        ),
        (
            "/platform/secretFile",
            stack.var("PLATFORM_SECRET_FILE").into(),
        ),
    ];
    for (pointer, local) in swaps {
        let slot = config
            .pointer_mut(pointer)
            .unwrap_or_else(|| panic!("the chart's sidecar.yaml has no {pointer}"));
        let mounted = slot.as_str().unwrap().to_string();
        assert!(
            mounts
                .iter()
                .any(|m| mounted == *m || mounted.starts_with(&format!("{m}/"))),
            "{pointer} = {mounted} lies in no volume mount of the sidecar ({mounts:?})"
        );
        *slot = json!(local);
    }
    config["listen"] = json!(format!("127.0.0.1:{sidecar_port}"));
    assert_eq!(
        config["homeserver"]["asTokenSecret"],
        json!(as_token_secret)
    );
    let args: Vec<String> = serde_json::from_value(sidecar["args"].clone()).unwrap();
    assert_eq!(args[..2], ["sidecar", "--config"]);
    assert!(
        mounts.iter().any(|m| args[2].starts_with(&format!("{m}/"))),
        "the config file is mounted"
    );
    let config_path = dir.join("sidecar.yaml");
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let sidecar_log = dir.join("sidecar.log");
    let sidecar_pod = format!("{release}-sidecar");
    let _sidecar = tokio::process::Command::new(env!("CARGO_BIN_EXE_openmeet-matrix-operator"))
        .args(&args[..2])
        .arg(&config_path)
        .env_clear()
        .envs(plain_env(sidecar))
        .envs(downward_env(sidecar, &sidecar_pod, &ns))
        .env("KUBECONFIG", &sidecar_kubeconfig)
        // No fixed metrics port: tests run side by side.
        .env("SIDECAR_METRICS_LISTEN", "off")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&sidecar_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the sidecar binary");
    // Ready means its watches of MatrixUsers and tenant namespaces are synced.
    let https = https_client();
    wait_for("the sidecar's /readyz", || async {
        let r = https
            .get(format!("{sidecar_url}/readyz"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    // A code redeemed twice: the first redemption records a Lease, the
    // replay marks it revoked (the sidecar's Lease permissions at work).
    let redirect = format!("{}/_synapse/client/oidc/callback", stack.var("SYNAPSE_URL"));
    let verifier = format!("{}-{}", unique("verifier"), "v".repeat(43));
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let authorized = https
        .get(format!("{sidecar_url}/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", "synapse"),
            ("redirect_uri", redirect.as_str()),
            ("scope", "openid"),
            ("state", "chart"),
            ("nonce", "chart-nonce"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .bearer_auth(crate::sidecar::platform_token(&subject, &ns))
        .send()
        .await
        .unwrap();
    assert!(
        authorized.status().is_redirection(),
        "authorize: {}",
        authorized.status()
    );
    let back = url::Url::parse(authorized.headers()["location"].to_str().unwrap()).unwrap();
    let code = back
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("a code");
    let client_secret = std::fs::read_to_string(stack.var("OIDC_CLIENT_SECRET_FILE")).unwrap();
    let redeem = || {
        https
            .post(format!("{sidecar_url}/token"))
            .basic_auth("synapse", Some(client_secret.trim()))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect.as_str()),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
    };
    let first = redeem().await.unwrap();
    assert_eq!(first.status(), reqwest::StatusCode::OK, "first redemption");
    let replay = redeem().await.unwrap();
    assert_eq!(replay.status(), reqwest::StatusCode::BAD_REQUEST, "replay");
    // The records are in the sidecar's own namespace, none beside the
    // leader Lease.
    let state_namespace = config["stateNamespace"].as_str().expect("stateNamespace");
    assert_ne!(state_namespace, ns);
    assert!(of_kind(&docs, "Namespace")
        .iter()
        .any(|n| n["metadata"]["name"] == state_namespace));
    let beside_leader = leases
        .list(&ListParams::default().labels("matrix.openmeet.net/oidc-code"))
        .await
        .unwrap();
    assert!(beside_leader.items.is_empty(), "no record in {ns}");
    let records = Api::<Lease>::namespaced(env.client.clone(), state_namespace)
        .list(&ListParams::default().labels("matrix.openmeet.net/oidc-code"))
        .await
        .unwrap();
    assert_eq!(records.items.len(), 1, "one redemption record");
    let record = &records.items[0];
    assert_eq!(
        record.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some(sidecar_pod.as_str())
    );
    assert!(
        record
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("matrix.openmeet.net/revoked")),
        "the replay revoked the code"
    );

    let sidecar_logged = std::fs::read_to_string(&sidecar_log).unwrap_or_default();
    assert!(
        !sidecar_logged.to_lowercase().contains("forbidden"),
        "no request was refused:\n{sidecar_logged}"
    );

    // What the internet-facing sidecar may not do: touch the leader Lease
    // (or any Lease beside it), write MatrixUsers, read other Secrets.
    let leader_patch = r#"{"metadata":{"annotations":{"openmeet.test/tampered":"yes"}}}"#;
    for (what, args) in [
        (
            "patch the leader Lease",
            vec![
                "-n",
                &ns,
                "patch",
                "lease",
                &lease_name,
                "--type=merge",
                "-p",
                leader_patch,
            ],
        ),
        (
            "delete the leader Lease",
            vec!["-n", &ns, "delete", "lease", &lease_name],
        ),
        (
            "read the leader Lease",
            vec!["-n", &ns, "get", "lease", &lease_name],
        ),
        ("list Leases beside it", vec!["-n", &ns, "get", "leases"]),
        (
            "write a MatrixUser",
            vec![
                "-n",
                &ns,
                "label",
                "matrixuser",
                "ann",
                "openmeet.test/tampered=yes",
            ],
        ),
        ("read another Secret", vec!["-n", &ns, "get", "secrets"]),
        ("read MatrixRooms", vec!["-n", &ns, "get", "matrixrooms"]),
    ] {
        let (allowed, out) = kubectl(&sidecar_kubeconfig, &args, None).await;
        assert!(
            !allowed && out.contains("Forbidden"),
            "the sidecar's account may {what}: {out}"
        );
    }
    let lease = leases.get(&lease_name).await.unwrap();
    assert!(
        !lease
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("openmeet.test/tampered"),
        "the leader Lease is untouched"
    );
    // And the controller's account has no business with the records.
    let (allowed, out) =
        kubectl(&kubeconfig, &["-n", state_namespace, "get", "leases"], None).await;
    assert!(!allowed && out.contains("Forbidden"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `kubectl auth can-i <verb> <resource> -n <ns>` as `user` (impersonated by
/// the stack's admin): the real API server's authorizer answers.
/// A `/status` suffix asks about the subresource.
async fn can_i(user: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let mut args = vec!["auth", "can-i", verb, "-n", ns, "--as", user];
    match resource.strip_suffix("/status") {
        Some(kind) => args.extend([kind, "--subresource", "status"]),
        None => args.push(resource),
    }
    let (yes, out) = kubectl(Stack::get().var("KUBECONFIG"), &args, None).await;
    assert!(
        out.trim() == "yes" || out.trim().starts_with("no"),
        "kubectl auth can-i: {out}"
    );
    yes
}

#[tokio::test]
async fn platform_roles_grant_what_they_should() {
    let stack = Stack::get();
    let env = TestEnv::with(
        "chart-platform",
        Options {
            namespaces: 2,
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let (ns, other) = (env.ns(0).to_string(), env.ns(1).to_string());
    let dir = scratch("chart-platform");
    let release = unique("plat");
    let manifest = template(
        &dir,
        &release,
        &ns,
        &json!({"rbac": {"platformWriter": {
            "serviceAccount": {"create": true},
            "subjects": [{"kind": "User", "name": format!("{release}-writer")}],
            "namespaces": [ns],
        }}}),
    )
    .expect("helm template");
    let docs = documents(&manifest);
    let platform: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            let component = &d["metadata"]["labels"]["app.kubernetes.io/component"];
            component == "platform-writer" || component == "rbac-aggregate"
        })
        .collect();
    let mut kinds: Vec<&str> = platform.iter().filter_map(|d| d["kind"].as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "RoleBinding",
            "ServiceAccount"
        ],
        "writer role, view and edit roles, one binding, the ServiceAccount"
    );
    let _cleanup = ClusterScoped(
        platform
            .iter()
            .filter(|d| d["kind"] == "ClusterRole")
            .map(|d| {
                (
                    "clusterrole".to_string(),
                    d["metadata"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
    );
    let (ok, out) = kubectl(
        stack.var("KUBECONFIG"),
        &[
            "apply",
            "--server-side",
            "--field-manager=chart-test",
            "-f",
            "-",
        ],
        Some(to_yaml_stream(&platform)),
    )
    .await;
    assert!(ok, "applying the platform's RBAC: {out}");

    // The writer (the chart's ServiceAccount and the listed user) writes the
    // three kinds in its tenant namespace, and nothing else.
    let account = platform
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .unwrap()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    for writer in [
        format!("system:serviceaccount:{ns}:{account}"),
        format!("{release}-writer"),
    ] {
        for resource in [
            "matrixusers.matrix.openmeet.net",
            "matrixrooms.matrix.openmeet.net",
            "roompermissions.matrix.openmeet.net",
            "matrixusergrants.matrix.openmeet.net",
        ] {
            for verb in [
                "get", "list", "watch", "create", "update", "patch", "delete",
            ] {
                assert!(
                    can_i(&writer, verb, resource, &ns).await,
                    "{writer} may {verb} {resource}"
                );
            }
            assert!(
                !can_i(&writer, "create", resource, &other).await,
                "{writer} may not write in another tenant's namespace"
            );
        }
        for (verb, resource) in [
            ("patch", "matrixrooms.matrix.openmeet.net/status"),
            ("deletecollection", "matrixrooms.matrix.openmeet.net"),
            ("get", "secrets"),
            ("create", "namespaces"),
            ("create", "rolebindings.rbac.authorization.k8s.io"),
        ] {
            assert!(
                !can_i(&writer, verb, resource, &ns).await,
                "{writer} may not {verb} {resource}"
            );
        }
    }

    // The aggregated roles carry the labels the real API server's built-in
    // view, edit and admin ClusterRoles select: kube-controller-manager (not
    // in the stack) folds them in.
    let cluster_roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(env.client.clone());
    let selects = |builtin: &k8s_openapi::api::rbac::v1::ClusterRole, role: &Value| {
        let labels = &role["metadata"]["labels"];
        builtin
            .aggregation_rule
            .as_ref()
            .and_then(|a| a.cluster_role_selectors.as_ref())
            .into_iter()
            .flatten()
            .any(|s| {
                s.match_labels
                    .as_ref()
                    .is_some_and(|m| m.iter().all(|(k, v)| labels[k] == json!(v)))
            })
    };
    let role = |suffix: &str| {
        *platform
            .iter()
            .find(|d| {
                d["kind"] == "ClusterRole"
                    && d["metadata"]["name"].as_str().unwrap().ends_with(suffix)
            })
            .unwrap()
    };
    let (view, edit) = (role("-view"), role("-edit"));
    for (builtin, joins) in [
        ("view", vec![true, false]),
        ("edit", vec![true, true]),
        ("admin", vec![true, true]),
    ] {
        let builtin_role = cluster_roles.get(builtin).await.expect("built-in role");
        assert_eq!(
            vec![selects(&builtin_role, view), selects(&builtin_role, edit)],
            joins,
            "which of ours the built-in {builtin} aggregates"
        );
    }
    // And what they grant, bound in a namespace as the aggregation would.
    for (role, user, writes) in [(view, "viewer", false), (edit, "editor", true)] {
        let binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": format!("{release}-{user}"), "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role["metadata"]["name"]},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": format!("{release}-{user}")}],
        });
        let (ok, out) = kubectl(
            stack.var("KUBECONFIG"),
            &[
                "apply",
                "--server-side",
                "--field-manager=chart-test",
                "-f",
                "-",
            ],
            Some(to_yaml_stream(&[&binding])),
        )
        .await;
        assert!(ok, "{out}");
        let subject = format!("{release}-{user}");
        assert_eq!(
            can_i(&subject, "list", "roompermissions.matrix.openmeet.net", &ns).await,
            !writes,
            "{user} reads (edit's reading comes from view through aggregation)"
        );
        assert_eq!(
            can_i(&subject, "delete", "matrixrooms.matrix.openmeet.net", &ns).await,
            writes,
            "{user} deletes?"
        );
        assert!(!can_i(&subject, "get", "matrixusers.matrix.openmeet.net", &other).await);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Off by default; when enabled, the PrometheusRule alerts on stalled and
/// not-Ready objects, Synapse unreachable and no leader, and every series
/// its expressions read is one the controller exports. The Argo CD health
/// ConfigMap holds exactly the Lua files the health tests run.
#[tokio::test]
async fn chart_renders_the_prometheus_rule_and_argocd_health_checks() {
    use openmeet_matrix_operator::metrics::{render, Readiness, Sources};
    let dir = scratch("chart-rule");
    let defaults = documents(&template(&dir, "plain", "ops", &json!({})).unwrap());
    assert!(of_kind(&defaults, "PrometheusRule").is_empty());
    assert!(!defaults
        .iter()
        .any(|d| d["metadata"]["name"] == "plain-openmeet-matrix-operator-argocd-health"));

    let docs = documents(
        &template(
            &dir,
            "obs",
            "ops",
            &json!({"metrics": {"prometheusRule": {"enabled": true, "labels": {"release": "kube-prometheus"}, "stalledFor": "20m"},
                                "grafanaDashboard": {"enabled": true}},
                    "argocd": {"healthChecks": true}}),
        )
        .unwrap(),
    );
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    let rule = rules[0];
    assert_eq!(rule["metadata"]["labels"]["release"], "kube-prometheus");
    let alerts: Vec<&Value> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let names: Vec<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "OpenMeetMatrixObjectsStalled",
            "OpenMeetMatrixObjectsNotReady",
            "OpenMeetSynapseUnreachable",
            "OpenMeetNoLeader"
        ]
    );
    assert_eq!(alerts[0]["for"], "20m");
    // Each alert links its section of docs/runbooks.md.
    let runbooks = std::fs::read_to_string(format!("{ROOT}/docs/runbooks.md")).unwrap();
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        let url = alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        assert!(
            url.ends_with(&format!("/docs/runbooks.md#{}", name.to_lowercase())),
            "{name}: runbook_url {url:?}"
        );
        assert!(
            runbooks.contains(&format!("\n## {name}\n")),
            "{name} has no runbook"
        );
    }

    // What a controller replica exports once it holds an object, after one
    // readiness probe (families without samples are not exported at all).
    let env = TestEnv::new("chart-rule").await;
    env.create_user(0, "u", json!({"localpart": unique("rule")}))
        .await;
    env.wait_ready(0, "u", true, "Converged").await;
    let readiness = std::sync::Arc::new(Readiness::new(
        Stack::get().synapse(),
        std::sync::Arc::default(),
    ));
    readiness.probe_now().await;
    let exported = render(&Sources {
        synapse: env.operator_synapse.stats_handle(),
        reconciles: env.stats.clone(),
        readiness: Some(readiness),
        feed: Some(std::sync::Arc::default()),
        kube: None,
    });
    let series = regex::Regex::new(r"openmeet_[a-z_]+").unwrap();
    for alert in &alerts {
        let expr = alert["expr"].as_str().unwrap();
        assert!(expr.contains(r#"namespace="ops""#), "{expr}");
        for name in series.find_iter(expr).map(|m| m.as_str()) {
            assert!(
                exported.contains(&format!("# TYPE {name} ")),
                "{name} (in {expr}) is not exported:\n{exported}"
            );
        }
    }
    assert!(
        exported.contains("openmeet_synapse_reachable 1"),
        "{exported}"
    );

    // The dashboard: provisioned by Grafana's sidecar, and every series it
    // reads is one a binary exports (the controller's, as rendered above;
    // the sidecar's, as it registers them).
    let dashboard = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "obs-openmeet-matrix-operator-dashboard")
        .expect("the Grafana dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(
        dashboard["data"]["openmeet-matrix-operator.json"]
            .as_str()
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    let sidecar_source = std::fs::read_to_string(format!("{ROOT}/src/sidecar/mod.rs")).unwrap();
    let any_series = regex::Regex::new(r"(openmeet|process)_[a-z_]+").unwrap();
    let mut read = 0;
    for panel in json["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains(r#"namespace="$namespace""#), "{expr}");
            for name in any_series.find_iter(expr).map(|m| m.as_str()) {
                let family = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
                assert!(
                    exported.contains(&format!("# TYPE {family} "))
                        || sidecar_source.contains(&format!("\"{family}\"")),
                    "{name} (in {expr}) is exported by neither binary"
                );
                read += 1;
            }
        }
    }
    assert!(read >= 14, "the dashboard reads {read} series");

    let health = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "obs-openmeet-matrix-operator-argocd-health")
        .expect("the Argo CD health ConfigMap");
    for kind in [
        "MatrixUser",
        "MatrixRoom",
        "RoomPermission",
        "MatrixUserGrant",
    ] {
        let lua = std::fs::read_to_string(format!("{CHART}/argocd/health.lua")).unwrap();
        assert_eq!(
            health["data"][format!("resource.customizations.health.matrix.openmeet.net_{kind}")]
                .as_str()
                .map(str::trim_end),
            Some(lua.trim_end()),
            "{kind}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
