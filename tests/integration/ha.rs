//! Several controller replicas: exactly one reconciles (it holds the Lease);
//! when it dies, another takes over and converges new changes.

use crate::harness::{controller_command, free_port, unique, wait_for, Options, TestEnv};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use std::time::{Duration, Instant};

struct Replica {
    child: tokio::process::Child,
    metrics: String,
}

fn replica(env: &TestEnv, lease: &str, name: &str) -> Replica {
    let port = free_port();
    let child = controller_command(env)
        .env("LEADER_ELECT", "true")
        .env("LEASE_NAME", lease)
        .env("POD_NAMESPACE", env.ns(0))
        .env("POD_NAME", name)
        .env("LEASE_DURATION_SECONDS", "4")
        .env("LEASE_RENEW_SECONDS", "1")
        .env("METRICS_LISTEN", format!("127.0.0.1:{port}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start controller replica");
    Replica {
        child,
        metrics: format!("http://127.0.0.1:{port}"),
    }
}

async fn holder(env: &TestEnv, lease: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), env.ns(0));
    leases.get_opt(lease).await.ok()??.spec?.holder_identity
}

async fn scrape(r: &Replica) -> String {
    reqwest::get(format!("{}/metrics", r.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The replica's `openmeet_leader` gauge.
async fn leader_gauge(r: &Replica) -> Option<u64> {
    scrape(r)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("openmeet_leader ")?.parse().ok())
}

/// A gauge or the sum of a counter's samples, from the replica's /metrics.
async fn metric(r: &Replica, name: &str) -> u64 {
    scrape(r)
        .await
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The replica's count of MatrixUser reconciles, from its /metrics.
async fn user_reconciles(r: &Replica) -> u64 {
    let text = scrape(r).await;
    text.lines()
        .filter(|l| l.starts_with("openmeet_reconciles_total{kind=\"MatrixUser\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn one_leader_reconciles_and_a_standby_takes_over() {
    let env = TestEnv::with(
        "ha",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let lease = unique("lease");
    let mut a = replica(&env, &lease, "replica-a");
    wait_for("replica-a to lead", || async {
        (holder(&env, &lease).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let b = replica(&env, &lease, "replica-b");
    // The standby is ready (it serves the transaction endpoint) but does not reconcile.
    let http = reqwest::Client::new();
    wait_for("the standby to be ready", || async {
        let r = http
            .get(format!("{}/readyz", b.metrics))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    env.create_user(0, "first", json!({"localpart": unique("first")}))
        .await;
    env.wait_ready(0, "first", true, "Converged").await;
    assert!(user_reconciles(&a).await > 0);
    assert_eq!(user_reconciles(&b).await, 0, "only the leader reconciles");
    assert_eq!(holder(&env, &lease).await.as_deref(), Some("replica-a"));
    assert_eq!(leader_gauge(&a).await, Some(1), "the leader says so");
    assert_eq!(leader_gauge(&b).await, Some(0), "the standby says so");
    // The standby is warm: its caches are complete, and it has asked
    // Synapse nothing.
    wait_for("the standby's caches", || async {
        (metric(&b, "openmeet_caches_synced").await == 1).then_some(())
    })
    .await;
    assert_eq!(metric(&b, "openmeet_synapse_requests_total").await, 0);
    // Its queue holds the user, waiting for the lease; the leader's is empty.
    wait_for("the user in the standby's queue", || async {
        (metric(&b, "openmeet_reconcile_queue_depth").await == 1).then_some(())
    })
    .await;
    assert_eq!(metric(&a, "openmeet_reconcile_queue_depth").await, 0);

    // The leader dies without a word; the standby takes over once the lease
    // lapses, trusting what the leader converged: it reads nothing of it.
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    let killed = Instant::now();
    wait_for(
        "replica-b to take over and look at the converged user",
        || async {
            (holder(&env, &lease).await.as_deref() == Some("replica-b")
                && user_reconciles(&b).await > 0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        metric(&b, "openmeet_synapse_requests_total").await,
        0,
        "the converged user is trusted from its status"
    );
    wait_for("the new leader's queue to drain", || async {
        (metric(&b, "openmeet_reconcile_queue_depth").await == 0).then_some(())
    })
    .await;
    env.create_user(0, "second", json!({"localpart": unique("second")}))
        .await;
    env.wait_ready(0, "second", true, "Converged").await;
    assert_eq!(leader_gauge(&b).await, Some(1), "the new leader says so");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "hand-over took {:?}",
        killed.elapsed()
    );

    // A leader stopped with SIGTERM releases the lease at once.
    let pid = b.child.id().unwrap().to_string();
    let mut b = b;
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), b.child.wait())
        .await
        .expect("the leader exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(holder(&env, &lease).await, None, "released on shutdown");
}

/// Sends a signal to a child process.
async fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let status = tokio::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_leader_that_lost_its_lease_writes_nothing_more() {
    let env = TestEnv::with(
        "ha-fence",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    // The leader reaches Synapse through a proxy that logs its writes; slowed
    // down later, so it is in the middle of a room's joins when it freezes.
    let proxy = crate::proxy::HttpProxy::start().await;
    let lease = unique("lease");
    let port = free_port();
    let mut a = controller_command(&env)
        .env("SYNAPSE_URL", &proxy.url)
        .env("LEADER_ELECT", "true")
        .env("LEASE_NAME", &lease)
        .env("POD_NAMESPACE", env.ns(0))
        .env("POD_NAME", "replica-a")
        .env("LEASE_DURATION_SECONDS", "4")
        .env("LEASE_RENEW_SECONDS", "1")
        .env("METRICS_LISTEN", format!("127.0.0.1:{port}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start controller replica");
    wait_for("replica-a to lead", || async {
        (holder(&env, &lease).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    const MEMBERS: usize = 30;
    for i in 0..MEMBERS {
        env.create_user(0, &format!("u{i}"), json!({"localpart": unique("fence")}))
            .await;
    }
    for i in 0..MEMBERS {
        env.wait_ready(0, &format!("u{i}"), true, "Converged").await;
    }
    proxy.delay(Duration::from_millis(300));
    let before = proxy.writes().len();
    env.create::<openmeet_matrix_operator::api::MatrixRoom>(
        0,
        "room",
        json!({"alias": unique("fence")}),
    )
    .await;
    for i in 0..MEMBERS {
        env.create::<openmeet_matrix_operator::api::RoomPermission>(
            0,
            &format!("p{i}"),
            json!({"roomRef": {"name": "room"}, "userRef": {"name": format!("u{i}")}}),
        )
        .await;
    }
    wait_for("the leader to be joining members", || async {
        (proxy.writes().len() >= before + 4).then_some(())
    })
    .await;

    // Frozen (a long pause, a stalled node): it cannot renew, and the lease
    // passes to the standby once it lapses.
    signal(&a, "-STOP").await;
    let frozen = Instant::now();
    let b = replica(&env, &lease, "replica-b");
    wait_for("replica-b to lead", || async {
        (holder(&env, &lease).await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    // Thawed: its reconciles resume where they were, but no write may leave.
    signal(&a, "-CONT").await;
    let status = tokio::time::timeout(Duration::from_secs(30), a.wait())
        .await
        .expect("the old leader stops")
        .unwrap();
    assert!(!status.success(), "it exits as a lost leader: {status:?}");
    let lease_end = frozen + Duration::from_secs(4);
    let late: Vec<Duration> = proxy
        .writes()
        .into_iter()
        .filter(|t| *t > lease_end)
        .map(|t| t - frozen)
        .collect();
    assert!(
        late.is_empty(),
        "writes after the lease could have lapsed (s after freezing): {late:?}"
    );
    // The new leader converges the room.
    env.wait_condition::<openmeet_matrix_operator::api::MatrixRoom>(0, "room", true, "Converged")
        .await;
    drop(b);
}

/// A standby serves the application-service endpoint from the controller's
/// own room cache, warm before it leads: it marks a drifted room at once,
/// and asks Synapse nothing.
#[tokio::test]
async fn a_standby_marks_drift_from_its_warm_room_cache() {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use kube::api::PostParams;
    use openmeet_matrix_operator::api::MatrixRoom;
    use openmeet_matrix_operator::controller::room::DRIFT_ANNOTATION;

    // The test's in-process operator converges the room.
    let env = TestEnv::new("standby-feed").await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("standby")}))
        .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    let room_id = room.status.unwrap().room_id.unwrap();

    // Someone else holds the lease for an hour: the replica stays a standby.
    let lease_name = unique("held");
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), env.ns(0));
    let held = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(lease_name.clone()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("elsewhere".into()),
            lease_duration_seconds: Some(3600),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    leases.create(&PostParams::default(), &held).await.unwrap();
    let feed = free_port();
    let port = free_port();
    let standby = Replica {
        child: controller_command(&env)
            .env("LEADER_ELECT", "true")
            .env("LEASE_NAME", &lease_name)
            .env("POD_NAMESPACE", env.ns(0))
            .env("POD_NAME", "standby")
            .env("APPSERVICE_LISTEN", format!("127.0.0.1:{feed}"))
            .env("METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the standby"),
        metrics: format!("http://127.0.0.1:{port}"),
    };
    wait_for("the standby's caches", || async {
        // Not listening yet, at first.
        reqwest::get(format!("{}/metrics", standby.metrics))
            .await
            .ok()?;
        (metric(&standby, "openmeet_caches_synced").await == 1).then_some(())
    })
    .await;

    // Synapse's transaction, as it would push it.
    let stack = crate::harness::Stack::get();
    let hs_token =
        std::fs::read_to_string(format!("{}/synapse/appservice.env", stack.var("STACK_DIR")))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("HS_TOKEN=").map(str::to_string))
            .unwrap();
    let body = json!({"events": [{
        "type": "m.room.topic", "room_id": room_id, "sender": "@someone:openmeet.test",
        "state_key": "", "event_id": "$seen-by-the-standby", "content": {"topic": "x"},
    }]});
    let answer = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{feed}/_matrix/app/v1/transactions/{}",
            unique("txn")
        ))
        .bearer_auth(&hs_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let marked: MatrixRoom = env.api(0).get("r").await.unwrap();
    assert_eq!(
        marked
            .metadata
            .annotations
            .unwrap_or_default()
            .get(DRIFT_ANNOTATION)
            .map(String::as_str),
        Some("$seen-by-the-standby"),
        "marked before the answer"
    );
    assert_eq!(leader_gauge(&standby).await, Some(0));
    assert_eq!(metric(&standby, "openmeet_synapse_requests_total").await, 0);
    drop(standby);
}
