//! Upgrading a release: from the previous release's chart to this one, then
//! to a chart with a changed schema, with objects in place and the
//! controller converging them. CRDs are cluster-wide and every other test
//! shares the stack's, so this test runs its own etcd and kube-apiserver
//! (`tests/stack/control-plane.sh`) beside the stack; Synapse is the stack's.

use crate::chart::{helm, kubectl, scratch, CHART, CI_VALUES, ROOT};
use crate::harness::{controller_command, free_port, unique, wait_for, Options, Stack, TestEnv};
use crate::rooms::membership;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Resource};
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, MatrixUserGrant, RoomPermission};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// An etcd and kube-apiserver of this test's own, stopped when dropped.
struct ControlPlane {
    process: std::process::Child,
    kubeconfig: PathBuf,
}

impl ControlPlane {
    async fn start(dir: &Path) -> ControlPlane {
        // The stack's certificates serve any port on loopback.
        let pki = Path::new(Stack::get().var("STACK_CA")).parent().unwrap();
        let process = std::process::Command::new("bash")
            .arg(format!("{ROOT}/tests/stack/control-plane.sh"))
            .arg(dir)
            .arg(pki)
            .arg(free_port().to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starting tests/stack/control-plane.sh");
        let plane = ControlPlane {
            process,
            kubeconfig: dir.join("kubeconfig"),
        };
        let path = plane.path().to_string();
        wait_for("the test's own API server", || async {
            let ready = kubectl(&path, &["get", "--raw", "/readyz"], None).await.0;
            ready.then_some(())
        })
        .await;
        plane
    }

    fn path(&self) -> &str {
        self.kubeconfig.to_str().unwrap()
    }

    async fn client(&self) -> Client {
        let config = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
            .await
            .expect("kube config");
        Client::try_from(config).expect("client")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // TERM: the script stops etcd and the API server before it exits.
        let _ = std::process::Command::new("kill")
            .arg(self.process.id().to_string())
            .status();
        let _ = self.process.wait();
    }
}

/// `helm <args>` against `kubeconfig`: success, and what it printed.
async fn helm_at(kubeconfig: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(helm())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .await
        .expect("running helm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The chart of the latest release before this commit, in `dir`: its `v*`
/// tag, or in a clone without tags, the commit before the chart's version
/// last moved. Returns the revision and the chart's version.
fn previous_chart(dir: &Path) -> (String, String, PathBuf) {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-C", ROOT])
            .args(args)
            .output()
            .expect("running git");
        out.status
            .success()
            .then(|| String::from_utf8(out.stdout).unwrap().trim().to_string())
    };
    let chart_yaml = "charts/openmeet-matrix-operator/Chart.yaml";
    let rev = git(&["describe", "--tags", "--abbrev=0", "--match", "v*", "HEAD^"])
        .or_else(|| {
            let bump = git(&["log", "-1", "--format=%H", "-G^version: ", "--", chart_yaml])?;
            Some(format!("{bump}^"))
        })
        .expect(
            "no earlier release in this clone's history (a shallow clone? git fetch --unshallow)",
        );
    let extracted = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C '{ROOT}' archive '{rev}' charts/openmeet-matrix-operator | tar -x -C '{}'",
            dir.display()
        ))
        .status()
        .expect("git archive");
    assert!(extracted.success(), "extracting the chart of {rev}");
    let chart = dir.join("charts/openmeet-matrix-operator");
    let meta: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap()).unwrap();
    let version = meta["version"].as_str().expect("version").to_string();
    (rev, version, chart)
}

/// This chart with one more printer column on `MatrixRoom`, as a newer one.
fn next_chart(dir: &Path) -> PathBuf {
    let next = dir.join("next");
    let copied = std::process::Command::new("cp")
        .args(["-r", CHART])
        .arg(&next)
        .status()
        .unwrap();
    assert!(copied.success());
    let crds = next.join("files/crds.yaml");
    let text = std::fs::read_to_string(&crds).unwrap();
    let column =
        "    - jsonPath: .spec.topic\n      name: Topic\n      priority: 1\n      type: string\n";
    let marker = "  - additionalPrinterColumns:\n";
    let room = text.find("name: matrixrooms.matrix.openmeet.net").unwrap();
    let at = room + text[room..].find(marker).unwrap() + marker.len();
    let text = format!("{}{column}{}", &text[..at], &text[at..]);
    std::fs::write(&crds, text).unwrap();
    let chart = next.join("Chart.yaml");
    let text = std::fs::read_to_string(&chart)
        .unwrap()
        .replace("\nversion: ", "\nversion: 99.0.0\n# was: ");
    std::fs::write(&chart, text).unwrap();
    next
}

/// Creates an object in `ns`, labelled for the controller's selector.
async fn create<K>(client: &Client, ns: &str, run_id: &str, name: &str, spec: Value) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "namespace": ns, "labels": {crate::harness::LABEL: run_id}},
        "spec": spec,
    }))
    .unwrap();
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .expect("create")
}

/// The object's Ready condition, once it is Ready for its generation.
async fn ready<K>(client: &Client, ns: &str, name: &str) -> Value
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    wait_for(&format!("{} {name} Ready", K::kind(&())), || async {
        let object = serde_json::to_value(api.get(name).await.ok()?).ok()?;
        let condition = object["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        let current = condition["observedGeneration"] == object["metadata"]["generation"];
        (condition["status"] == "True" && current).then_some(condition)
    })
    .await
}

async fn crd(client: &Client, name: &str) -> Option<CustomResourceDefinition> {
    Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt(&format!("{name}.matrix.openmeet.net"))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_release_upgrades_its_crds_with_objects_in_place_and_uninstall_keeps_them() {
    let env = TestEnv::with(
        "upgrade",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let dir = scratch("upgrade");
    let plane = ControlPlane::start(&dir.join("control-plane")).await;
    let (kubeconfig, client) = (plane.path().to_string(), plane.client().await);
    let (release, release_ns) = ("omo", "openmeet-system");

    // The previous release, as its chart installs it (CRDs from crds/).
    let (tag, previous_version, previous) = previous_chart(&dir);
    let previous_values = previous.join("ci/test-values.yaml");
    let (ok, out) = helm_at(
        &kubeconfig,
        &[
            "install",
            release,
            previous.to_str().unwrap(),
            "-n",
            release_ns,
            "--create-namespace",
            "-f",
            previous_values.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "helm install of {tag}: {out}");

    // A tenant's objects, written while the previous release runs.
    let (tenant, partner) = ("acme", "partner");
    for ns in [tenant, partner] {
        let object: Namespace = serde_json::from_value(json!({"metadata": {"name": ns,
            "labels": {"matrix.openmeet.net/tenant": ns}}}))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }
    let run = env.run_id.clone();
    let host_localpart = unique("host");
    let host: MatrixUser = create(
        &client,
        tenant,
        &run,
        "host",
        json!({"localpart": host_localpart}),
    )
    .await;
    let room: MatrixRoom = create(
        &client,
        tenant,
        &run,
        "meetup",
        json!({"alias": unique("upgrade")}),
    )
    .await;
    create::<RoomPermission>(
        &client,
        tenant,
        &run,
        "host-meetup",
        json!({"roomRef": {"name": "meetup"}, "userRef": {"name": "host"}, "role": "Admin"}),
    )
    .await;

    // Upgrading from a chart that shipped crds/: Helm does not own those
    // CRDs, so the first upgrade must be told to take them over.
    let current = ["upgrade", release, CHART, "-n", release_ns, "-f", CI_VALUES];
    let unowned = previous.join("crds").is_dir();
    if unowned {
        let (ok, out) = helm_at(&kubeconfig, &current).await;
        assert!(
            !ok && out.contains("CustomResourceDefinition") && out.contains("ownership"),
            "an upgrade that does not take over the CRDs is refused: {out}"
        );
    }
    let take_over: &[&str] = if unowned { &["--take-ownership"] } else { &[] };
    let (ok, out) = helm_at(&kubeconfig, &[&current[..], take_over].concat()).await;
    assert!(ok, "helm upgrade from {tag}: {out}");
    for kind in [
        "matrixusers",
        "matrixrooms",
        "roompermissions",
        "matrixusergrants",
    ] {
        let crd = crd(&client, kind)
            .await
            .unwrap_or_else(|| panic!("{kind} CRD"));
        let annotations = crd.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations
                .get("helm.sh/resource-policy")
                .map(String::as_str),
            Some("keep"),
            "{kind}"
        );
        assert_eq!(
            annotations
                .get("argocd.argoproj.io/sync-options")
                .map(String::as_str),
            Some("Delete=false,Prune=false"),
            "{kind}: Argo CD keeps it too"
        );
        assert_eq!(
            annotations
                .get("meta.helm.sh/release-name")
                .map(String::as_str),
            Some(release),
            "{kind}: the release owns it"
        );
    }
    // The objects stayed, the same objects.
    let rooms = Api::<MatrixRoom>::namespaced(client.clone(), tenant);
    assert_eq!(
        rooms.get("meetup").await.unwrap().metadata.uid,
        room.metadata.uid
    );
    let users = Api::<MatrixUser>::namespaced(client.clone(), tenant);
    assert_eq!(
        users.get("host").await.unwrap().metadata.uid,
        host.metadata.uid
    );

    // The controller converges them, and the new schema is in use: a partner
    // tenant grants the meetup one of its users.
    let appservice = Api::<Secret>::namespaced(env.client.clone(), "openmeet-system")
        .get("matrix-appservice")
        .await
        .unwrap();
    let copy: Secret = serde_json::from_value(json!({
        "metadata": {"name": "matrix-appservice", "namespace": release_ns},
        "data": serde_json::to_value(appservice.data).unwrap(),
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), release_ns)
        .create(&PostParams::default(), &copy)
        .await
        .unwrap();
    let _controller = controller_command(&env)
        .env("KUBECONFIG", &kubeconfig)
        .stderr(std::fs::File::create(dir.join("controller.log")).unwrap())
        .spawn()
        .expect("controller");
    let room_ready = ready::<MatrixRoom>(&client, tenant, "meetup").await;
    ready::<RoomPermission>(&client, tenant, "host-meetup").await;
    let guest_localpart = unique("speaker");
    create::<MatrixUser>(
        &client,
        partner,
        &run,
        "speaker",
        json!({"localpart": guest_localpart}),
    )
    .await;
    create::<MatrixUserGrant>(
        &client,
        partner,
        &run,
        "speakers",
        json!({"from": [{"namespace": tenant}], "maxRole": "Member"}),
    )
    .await;
    create::<RoomPermission>(
        &client,
        tenant,
        &run,
        "speaker-meetup",
        json!({"roomRef": {"name": "meetup"}, "userRef": {"namespace": partner, "name": "speaker"}}),
    )
    .await;
    ready::<RoomPermission>(&client, tenant, "speaker-meetup").await;
    let room_id = rooms
        .get("meetup")
        .await
        .unwrap()
        .status
        .unwrap()
        .room_id
        .unwrap();
    let state = env.synapse.room_state(&room_id).await.unwrap().unwrap();
    assert_eq!(
        membership(&state, env.user_id(&host_localpart).as_str()),
        "join"
    );
    assert_eq!(
        membership(&state, env.user_id(&guest_localpart).as_str()),
        "join"
    );

    // A newer chart changes a CRD: `helm upgrade` alone applies it, and the
    // objects stay Ready throughout (the condition never changed).
    let next = next_chart(&dir);
    let (ok, out) = helm_at(
        &kubeconfig,
        &[
            "upgrade",
            release,
            next.to_str().unwrap(),
            "-n",
            release_ns,
            "-f",
            CI_VALUES,
        ],
    )
    .await;
    assert!(ok, "helm upgrade to a newer chart: {out}");
    let rooms_crd = crd(&client, "matrixrooms").await.unwrap();
    let columns =
        serde_json::to_value(&rooms_crd.spec.versions[0].additional_printer_columns).unwrap();
    assert!(
        columns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "Topic"),
        "the newer chart's column is served: {columns}"
    );
    rooms
        .patch(
            "meetup",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"topic": "Upgraded"}})),
        )
        .await
        .unwrap();
    let after = ready::<MatrixRoom>(&client, tenant, "meetup").await;
    assert_eq!(
        after["lastTransitionTime"], room_ready["lastTransitionTime"],
        "Ready all along"
    );

    // `helm history` tells the three revisions apart.
    let (ok, out) = helm_at(
        &kubeconfig,
        &["history", release, "-n", release_ns, "-o", "json"],
    )
    .await;
    assert!(ok, "{out}");
    let history: Vec<Value> = serde_json::from_str(&out).unwrap();
    let charts: Vec<&str> = history
        .iter()
        .map(|r| r["chart"].as_str().unwrap())
        .collect();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        charts,
        [
            format!("openmeet-matrix-operator-{previous_version}"),
            format!("openmeet-matrix-operator-{version}"),
            "openmeet-matrix-operator-99.0.0".to_string(),
        ]
    );

    // Uninstalling keeps the CRDs, and so every object.
    let (ok, out) = helm_at(&kubeconfig, &["uninstall", release, "-n", release_ns]).await;
    assert!(ok, "{out}");
    for kind in [
        "matrixusers",
        "matrixrooms",
        "roompermissions",
        "matrixusergrants",
    ] {
        assert!(crd(&client, kind).await.is_some(), "{kind} CRD kept");
    }
    assert_eq!(
        rooms.get("meetup").await.unwrap().metadata.uid,
        room.metadata.uid
    );
    let grants = Api::<MatrixUserGrant>::namespaced(client.clone(), partner);
    assert!(grants.get_opt("speakers").await.unwrap().is_some());
    drop(plane);
    let _ = std::fs::remove_dir_all(dir);
}
