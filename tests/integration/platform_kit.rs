//! The platform's TypeScript kit (`clients/typescript`), run with Node as the
//! platform would run it, against the real stack: what it applies converges
//! in Synapse, applying again changes nothing, a changed event converges
//! (roles, members who left), `force` decides who wins a field, and deleting
//! the event's room closes it. A group is applied as a space with its chat
//! room and an event as children, and two members' direct conversation as a
//! Direct room. A member of another tenant is invited into a room (a grant in
//! their tenant, a permission in the room's) and withdrawn.

use crate::harness::{unique, wait_for, Options, Stack, TestEnv, LABEL};
use crate::rooms::{as_user, login_as, membership, state, urlencode};
use kube::api::{Patch, PatchParams};
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, MatrixUserGrant, RoomPermission};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

const KIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/typescript");

/// Compiles the kit with its own TypeScript (once per test binary).
fn built_kit() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let kit = PathBuf::from(KIT);
            let tsc = kit.join("node_modules/typescript/bin/tsc");
            assert!(
                tsc.exists(),
                "{} is missing: run `make ts-deps` (npm ci in clients/typescript)",
                tsc.display()
            );
            let out = Command::new("node")
                .arg(&tsc)
                .args(["-p", "tsconfig.json"])
                .current_dir(&kit)
                .output()
                .expect("running node (Node.js >= 20 is needed)");
            assert!(
                out.status.success(),
                "tsc failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            kit
        })
        .clone()
}

/// What one run of one of the kit's examples printed.
struct Run {
    ok: bool,
    /// `(kind, name)` → `(resourceVersion, generation)`, in the order written.
    written: Vec<((String, String), (String, i64))>,
    removed: Vec<String>,
    /// With `--wait`: how many objects the kit saw Ready.
    ready: Option<usize>,
    stderr: String,
}

/// Runs `examples/apply-event.js` against the stack.
async fn apply_event(env: &TestEnv, args: &[String]) -> Run {
    run_example(env, "apply-event", args).await
}

/// Runs the example `examples/<name>.js` against the stack, labelled for
/// this test's operator.
async fn run_example(env: &TestEnv, name: &str, args: &[String]) -> Run {
    let kit = built_kit();
    // Not blocking: the test's operator runs on this thread, and `--wait`
    // waits for it.
    let out = tokio::process::Command::new("node")
        .arg(kit.join(format!("dist/examples/{name}.js")))
        .args(["--namespace", env.ns(0), "--tenant", env.ns(0)])
        .args(["--label", &format!("{LABEL}={}", env.run_id)])
        .args(args)
        .env("KUBECONFIG", Stack::get().var("KUBECONFIG"))
        .current_dir(&kit)
        .output()
        .await
        .expect("running node");
    let mut written = Vec::new();
    let mut removed = Vec::new();
    let mut ready = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        if let Some(name) = v["removed"].as_str() {
            removed.push(name.to_string());
        } else if let Some(n) = v["ready"].as_u64() {
            ready = Some(n as usize);
        } else if v.get("kind").is_some() {
            written.push((
                (
                    v["kind"].as_str().unwrap().into(),
                    v["name"].as_str().unwrap().into(),
                ),
                (
                    v["resourceVersion"].as_str().unwrap().into(),
                    v["generation"].as_i64().unwrap(),
                ),
            ));
        }
    }
    Run {
        ok: out.status.success(),
        written,
        removed,
        ready,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Whether the object is Ready=True now, as the API server has it.
async fn ready_now<K>(env: &TestEnv, name: &str) -> bool
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object = serde_json::to_value(env.api::<K>(0).get(name).await.unwrap()).unwrap();
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn names(run: &Run, kind: &str) -> Vec<String> {
    run.written
        .iter()
        .filter(|((k, _), _)| k == kind)
        .map(|((_, n), _)| n.clone())
        .collect()
}

/// `(kind, name)` → `(resourceVersion, generation)` as the API server has them now.
async fn versions(env: &TestEnv, run: &Run) -> BTreeMap<(String, String), (String, i64)> {
    let mut now = BTreeMap::new();
    for ((kind, name), _) in &run.written {
        let meta = match kind.as_str() {
            "MatrixUser" => env.api::<MatrixUser>(0).get(name).await.unwrap().metadata,
            "MatrixRoom" => env.api::<MatrixRoom>(0).get(name).await.unwrap().metadata,
            "RoomPermission" => {
                env.api::<RoomPermission>(0)
                    .get(name)
                    .await
                    .unwrap()
                    .metadata
            }
            other => panic!("unexpected kind {other}"),
        };
        now.insert(
            (kind.clone(), name.clone()),
            (meta.resource_version.unwrap(), meta.generation.unwrap()),
        );
    }
    now
}

fn power(state: &openmeet_matrix_operator::synapse::rooms::RoomState, user: &str) -> i64 {
    state
        .get("m.room.power_levels", "")
        .and_then(|pl| pl["users"].get(user).and_then(Value::as_i64))
        .unwrap_or(0)
}

#[tokio::test]
async fn kit_applies_an_event_that_converges_and_reapplies_as_a_no_op() {
    let env = TestEnv::new("kit").await;
    let slug = unique("Rust Meetup");
    let title = "Rust Meetup 2026";
    let people: Vec<(String, String)> = ["host", "mod", "att"]
        .iter()
        .map(|p| (unique(&format!("subject-{p}")), unique(&format!("kit-{p}"))))
        .collect();
    let person = |i: usize, role: &str| {
        vec![
            "--person".to_string(),
            format!("{}:{}:{role}", people[i].0, people[i].1),
        ]
    };
    let mut args = vec![
        "--event".to_string(),
        slug.clone(),
        "--title".into(),
        title.into(),
    ];
    let first_args: Vec<String> = [
        args.clone(),
        person(0, "host"),
        person(1, "moderator"),
        person(2, "attendee"),
    ]
    .concat();

    let first = apply_event(&env, &first_args).await;
    assert!(first.ok, "the kit failed: {}", first.stderr);
    let users = names(&first, "MatrixUser");
    let rooms = names(&first, "MatrixRoom");
    let perms = names(&first, "RoomPermission");
    assert_eq!((users.len(), rooms.len(), perms.len()), (3, 1, 3));
    let room_name = &rooms[0];
    // The slug had a space and capitals: cleaned, with a hash of the original.
    assert!(room_name.starts_with("event-rust-meetup-"), "{room_name}");

    for user in &users {
        env.wait_condition::<MatrixUser>(0, user, true, "Converged")
            .await;
    }
    env.wait_condition::<MatrixRoom>(0, room_name, true, "Converged")
        .await;
    for perm in &perms {
        env.wait_condition::<RoomPermission>(0, perm, true, "Converged")
            .await;
    }
    // The room may have converged before its members' accounts existed
    // (their permissions Pending): its status counts them once it folded them in.
    let room = wait_for("the room's members counted", || async {
        let room = env.api::<MatrixRoom>(0).get(room_name).await.ok()?;
        (room.status.as_ref()?.joined_members == Some(4)).then_some(room)
    })
    .await;

    // In Synapse: the room under the tenant's alias, everyone joined at the
    // power their event role maps to.
    let status = room.status.clone().unwrap();
    let alias = room.spec.alias.clone();
    assert!(
        alias.starts_with(&format!("{}.event.rust-meetup-", env.ns(0))),
        "{alias}"
    );
    assert_eq!(
        status.canonical_alias.as_deref(),
        Some(
            format!(
                "#openmeet-{alias}:{}",
                Stack::get().var("MATRIX_SERVER_NAME")
            )
            .as_str()
        )
    );
    let ids: Vec<String> = people
        .iter()
        .map(|(_, handle)| env.user_id(handle).to_string())
        .collect();
    let s = state(&env, &room).await;
    assert_eq!(s.get("m.room.name", "").unwrap()["name"], title);
    for id in &ids {
        assert_eq!(membership(&s, id), "join", "{id}");
    }
    assert_eq!(power(&s, &ids[0]), 100, "host: Admin");
    assert_eq!(power(&s, &ids[1]), 50, "moderator: Moderator");
    assert_eq!(power(&s, &ids[2]), 0, "attendee: Member");

    // Written under one field manager, by apply.
    let managers: Vec<(String, String)> = room
        .metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.subresource.is_none())
        .map(|m| (m.manager.unwrap(), m.operation.unwrap()))
        .collect();
    assert!(
        managers.contains(&("openmeet-platform".into(), "Apply".into())),
        "{managers:?}"
    );

    // Applying the same event again changes nothing. (First wait for the
    // controller's own status writes to settle.)
    let before = settled(&env, &first).await;
    let again = apply_event(&env, &first_args).await;
    assert!(again.ok, "the kit failed: {}", again.stderr);
    let answered: BTreeMap<_, _> = again.written.iter().cloned().collect();
    assert_eq!(answered, before, "the second apply's answers");
    assert_eq!(versions(&env, &first).await, before, "nothing written");
    assert!(again.removed.is_empty());

    // The event changes: the attendee becomes a moderator, the moderator leaves.
    let changed_args: Vec<String> =
        [args.clone(), person(0, "host"), person(2, "moderator")].concat();
    let changed = apply_event(&env, &changed_args).await;
    assert!(changed.ok, "the kit failed: {}", changed.stderr);
    assert_eq!(
        changed.removed,
        vec![perms[1].clone()],
        "the moderator's permission"
    );
    wait_for("the new roles in Synapse", || async {
        let s = state(&env, &room).await;
        (power(&s, &ids[2]) == 50 && membership(&s, &ids[1]) == "leave").then_some(())
    })
    .await;

    // Someone else takes the room's name with another field manager: an
    // apply without force is refused and writes nothing; with force (the
    // default) the platform's name comes back.
    env.api::<MatrixRoom>(0)
        .patch(
            room_name,
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(json!({
                "apiVersion": "matrix.openmeet.net/v1alpha1",
                "kind": "MatrixRoom",
                "spec": {"alias": alias, "name": "Taken over"},
            })),
        )
        .await
        .expect("another manager's apply");
    args.push("--no-force".into());
    let refused = apply_event(
        &env,
        &[args.clone(), person(0, "host"), person(2, "moderator")].concat(),
    )
    .await;
    assert!(!refused.ok, "an apply without force wins a conflict");
    assert!(
        refused.stderr.contains("conflict") || refused.stderr.contains("Conflict"),
        "{}",
        refused.stderr
    );
    let name_now = |r: MatrixRoom| r.spec.name;
    assert_eq!(
        name_now(env.api::<MatrixRoom>(0).get(room_name).await.unwrap()).as_deref(),
        Some("Taken over")
    );
    let forced = apply_event(&env, &changed_args).await;
    assert!(forced.ok, "the kit failed: {}", forced.stderr);
    assert_eq!(
        name_now(env.api::<MatrixRoom>(0).get(room_name).await.unwrap()).as_deref(),
        Some(title)
    );

    // Deleting the event's room: the room is closed (its default policy),
    // its permissions go with it, the accounts stay.
    let deleted = apply_event(&env, &["--event".into(), slug.clone(), "--delete".into()]).await;
    assert!(deleted.ok, "the kit failed: {}", deleted.stderr);
    env.wait_gone(&env.api::<MatrixRoom>(0), room_name).await;
    for perm in [&perms[0], &perms[2]] {
        env.wait_gone(&env.api::<RoomPermission>(0), perm).await;
    }
    let s = state(&env, &room).await;
    for id in [&ids[0], &ids[2]] {
        assert_eq!(membership(&s, id), "leave", "{id} removed by Close");
    }
    for user in &users {
        env.wait_condition::<MatrixUser>(0, user, true, "Converged")
            .await;
    }
}

/// Waits until the controller's own status writes to the objects `run`
/// wrote have settled, and returns their versions.
async fn settled(env: &TestEnv, run: &Run) -> BTreeMap<(String, String), (String, i64)> {
    wait_for("the objects to settle", || async {
        let seen = versions(env, run).await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        (versions(env, run).await == seen).then_some(seen)
    })
    .await
}

async fn room_named(env: &TestEnv, name: &str) -> MatrixRoom {
    env.api::<MatrixRoom>(0).get(name).await.unwrap()
}

fn room_id(room: &MatrixRoom) -> String {
    room.status.as_ref().unwrap().room_id.clone().unwrap()
}

async fn state_by_id(
    env: &TestEnv,
    id: &str,
) -> openmeet_matrix_operator::synapse::rooms::RoomState {
    env.synapse
        .room_state(id)
        .await
        .unwrap()
        .expect("room readable")
}

#[tokio::test]
async fn kit_applies_a_group_space_an_event_child_and_a_direct_room() {
    let env = TestEnv::new("kitspace").await;
    let group = unique("rust-berlin");
    let event = unique("rust-berlin-march");
    // The group's owner, a member who is not at the event, and an attendee.
    let people: Vec<(String, String)> = ["owner", "member", "att"]
        .iter()
        .map(|p| (unique(&format!("subject-{p}")), unique(&format!("kit-{p}"))))
        .collect();
    let mut args: Vec<String> = ["--group", &group, "--title", "Rust Berlin"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for ((subject, handle), role) in people.iter().zip(["owner", "member", "member"]) {
        args.push("--member".into());
        args.push(format!("{subject}:{handle}:{role}"));
    }
    args.extend(
        [
            "--event",
            &event,
            "--event-title",
            "March meetup",
            "--order",
            "2026-03-14",
            "--suggested",
            "--event-person",
            &format!("{}:host", people[0].0),
            "--event-person",
            &format!("{}:attendee", people[2].0),
            "--direct",
            &format!("{}:{}", people[1].0, people[2].0),
            // The kit waits, as kstatus reads the conditions, until it all converged.
            "--wait",
            "120",
        ]
        .iter()
        .map(|s| s.to_string()),
    );

    let first = run_example(&env, "apply-group", &args).await;
    assert!(first.ok, "the kit failed: {}", first.stderr);
    assert_eq!(
        first.ready,
        Some(first.written.len()),
        "the kit saw all of it Ready"
    );
    // And it was: Ready now, without waiting here.
    for ((kind, name), _) in &first.written {
        let now_ready = match kind.as_str() {
            "MatrixUser" => ready_now::<MatrixUser>(&env, name).await,
            "MatrixRoom" => ready_now::<MatrixRoom>(&env, name).await,
            _ => ready_now::<RoomPermission>(&env, name).await,
        };
        assert!(now_ready, "{kind} {name} not Ready after the kit's wait");
    }
    let users = names(&first, "MatrixUser");
    let rooms = names(&first, "MatrixRoom");
    let perms = names(&first, "RoomPermission");
    let space_name = format!("space-{group}");
    let chat_name = format!("group-{group}");
    let event_name = format!("event-{event}");
    assert_eq!(users.len(), 3);
    assert_eq!(rooms.len(), 4, "{rooms:?}");
    assert_eq!(
        &rooms[..3],
        &[space_name.clone(), chat_name.clone(), event_name.clone()]
    );
    let dm_name = rooms[3].clone();
    assert!(dm_name.starts_with("dm-"), "{dm_name}");
    // Three group members on the space and on the chat, two people at the
    // event, the two users of the direct conversation.
    assert_eq!(perms.len(), 3 + 3 + 2 + 2, "{perms:?}");

    for user in &users {
        env.wait_condition::<MatrixUser>(0, user, true, "Converged")
            .await;
    }
    for room in &rooms {
        env.wait_condition::<MatrixRoom>(0, room, true, "Converged")
            .await;
    }
    for perm in &perms {
        env.wait_condition::<RoomPermission>(0, perm, true, "Converged")
            .await;
    }
    let space = room_named(&env, &space_name).await;
    let chat = room_named(&env, &chat_name).await;
    let ev = room_named(&env, &event_name).await;
    let dm = room_named(&env, &dm_name).await;
    let (space_id, chat_id, event_id, dm_id) =
        (room_id(&space), room_id(&chat), room_id(&ev), room_id(&dm));
    let ids: Vec<String> = people
        .iter()
        .map(|(_, handle)| env.user_id(handle).to_string())
        .collect();
    let via = json!([Stack::get().var("MATRIX_SERVER_NAME")]);

    // In Synapse: a space listing the chat first and the event by its date,
    // both suggested; each child names the space as its canonical parent.
    let s = state_by_id(&env, &space_id).await;
    assert_eq!(s.get("m.room.create", "").unwrap()["type"], "m.space");
    let s = wait_for("the space lists the chat and the event", || async {
        let s = state_by_id(&env, &space_id).await;
        let linked = |id: &str| {
            s.get("m.space.child", id)
                .and_then(Value::as_object)
                .is_some_and(|o| !o.is_empty())
        };
        (linked(&chat_id) && linked(&event_id)).then_some(s)
    })
    .await;
    assert_eq!(
        s.get("m.space.child", &chat_id).unwrap(),
        &json!({"via": via, "order": "0", "suggested": true})
    );
    assert_eq!(
        s.get("m.space.child", &event_id).unwrap(),
        &json!({"via": via, "order": "2026-03-14", "suggested": true})
    );
    assert!(s.get("m.space.child", &dm_id).is_none(), "a DM is no child");
    for id in &ids {
        assert_eq!(membership(&s, id), "join", "{id} in the group's space");
    }
    for child in [&chat_id, &event_id] {
        let c = state_by_id(&env, child).await;
        assert_eq!(
            c.get("m.space.parent", &space_id).unwrap(),
            &json!({"via": via, "canonical": true})
        );
        assert_eq!(
            c.get("m.room.join_rules", "").unwrap(),
            &json!({"join_rule": "restricted",
                    "allow": [{"type": "m.room_membership", "room_id": space_id}]})
        );
    }
    // The event room holds its host (Admin) and attendee, not the whole group.
    let e = state_by_id(&env, &event_id).await;
    assert_eq!(membership(&e, &ids[0]), "join");
    assert_eq!(power(&e, &ids[0]), 100, "host: Admin");
    assert_eq!(membership(&e, &ids[2]), "join");
    assert_eq!(membership(&e, &ids[1]), "none", "a member not at the event");

    // The direct conversation: exactly its two users, encrypted.
    let d = state_by_id(&env, &dm_id).await;
    let admin = Stack::get().admin_user_id();
    let mut joined: Vec<String> = d
        .memberships()
        .into_iter()
        .filter(|(u, m)| m == "join" && *u != admin)
        .map(|(u, _)| u)
        .collect();
    joined.sort();
    let mut pair = vec![ids[1].clone(), ids[2].clone()];
    pair.sort();
    assert_eq!(joined, pair);
    assert!(d.get("m.room.encryption", "").is_some(), "encrypted");
    assert_eq!(dm.spec.source.as_ref().map(|s| s.slug.len()), Some(16));

    // Applying the same again changes nothing.
    let before = settled(&env, &first).await;
    let again = run_example(&env, "apply-group", &args).await;
    assert!(again.ok, "the kit failed: {}", again.stderr);
    let answered: BTreeMap<_, _> = again.written.iter().cloned().collect();
    assert_eq!(answered, before, "the second apply's answers");
    assert_eq!(versions(&env, &first).await, before, "nothing written");
    assert!(again.removed.is_empty());

    // The member not at the event joins it from a client, through the space,
    // and the (Exclusive) event room keeps them.
    let token = login_as(&ids[1]).await;
    let path = format!("/rooms/{}/join", urlencode(&event_id));
    assert!(as_user(&token, reqwest::Method::POST, &path, json!({}))
        .await
        .is_success());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let e = state_by_id(&env, &event_id).await;
    assert_eq!(
        membership(&e, &ids[1]),
        "join",
        "kept: a member of the space"
    );
}

/// A member of another tenant, as `examples/invite-guest.ts` invites one:
/// a `MatrixUserGrant` in the guest's namespace admitting the room's, then
/// the permission in the room's namespace naming the guest there. The guest
/// joins at the role asked for; withdrawn, they leave the room.
#[tokio::test]
async fn kit_invites_a_guest_of_another_tenant_and_withdraws_them() {
    let env = TestEnv::with(
        "kitguest",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let (host_ns, guest_ns) = (env.ns(0).to_string(), env.ns(1).to_string());

    // The guest: a Ready user of namespace 1, their own tenant.
    let guest = "user-dana";
    let guest_localpart = unique("kit-dana");
    env.create_user(1, guest, json!({"localpart": guest_localpart}))
        .await;
    env.wait_condition::<MatrixUser>(1, guest, true, "Converged")
        .await;
    let guest_id = env.user_id(&guest_localpart).to_string();

    // The host tenant's event room, with its host, applied by the kit.
    let (subject, handle) = (unique("subject-host"), unique("kit-host"));
    let event = apply_event(
        &env,
        &[
            "--event".into(),
            unique("guest-talk"),
            "--person".into(),
            format!("{subject}:{handle}:host"),
        ],
    )
    .await;
    assert!(event.ok, "the kit failed: {}", event.stderr);
    let room_name = names(&event, "MatrixRoom").remove(0);
    for user in names(&event, "MatrixUser") {
        env.wait_condition::<MatrixUser>(0, &user, true, "Converged")
            .await;
    }
    env.wait_condition::<MatrixRoom>(0, &room_name, true, "Converged")
        .await;
    for perm in names(&event, "RoomPermission") {
        env.wait_condition::<RoomPermission>(0, &perm, true, "Converged")
            .await;
    }
    let host_id = env.user_id(&handle).to_string();

    let invite = |extra: &[&str]| -> Vec<String> {
        [
            "--room",
            &room_name,
            "--guest-namespace",
            &guest_ns,
            "--guest",
            guest,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let invited = run_example(
        &env,
        "invite-guest",
        &invite(&[
            "--role",
            "Moderator",
            "--max-role",
            "Moderator",
            "--wait",
            "60",
        ]),
    )
    .await;
    assert!(invited.ok, "the kit failed: {}", invited.stderr);
    // The grant first, named for the inviting tenant (`--tenant`) and its
    // room; then the guest's permission, named with their namespace.
    let grant_name = format!("grant-{host_ns}-{room_name}");
    let perm_name = format!("{room_name}.{guest_ns}.{guest}");
    let kinds: Vec<(&str, &str)> = invited
        .written
        .iter()
        .map(|((k, n), _)| (k.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("MatrixUserGrant", grant_name.as_str()),
            ("RoomPermission", perm_name.as_str())
        ]
    );
    assert_eq!(invited.ready, Some(2), "the kit saw both Ready");

    // Written where they belong, labelled for this test's operator.
    let grant = env
        .api::<MatrixUserGrant>(1)
        .get(&grant_name)
        .await
        .expect("the grant, in the guest's namespace");
    assert_eq!(
        serde_json::to_value(&grant.spec).unwrap(),
        json!({"from": [{"namespace": host_ns}], "users": {"names": [guest]}, "maxRole": "Moderator"})
    );
    let perm = env
        .api::<RoomPermission>(0)
        .get(&perm_name)
        .await
        .expect("the permission, in the room's namespace");
    let spec = serde_json::to_value(&perm.spec).unwrap();
    assert_eq!(spec["roomRef"], json!({"name": room_name}));
    assert_eq!(
        spec["userRef"],
        json!({"name": guest, "namespace": guest_ns})
    );
    assert_eq!(spec["role"], "Moderator");
    for labels in [&grant.metadata.labels, &perm.metadata.labels] {
        let labels = labels.as_ref().unwrap();
        assert_eq!(labels.get(LABEL), Some(&env.run_id), "{labels:?}");
    }

    // In Synapse: the guest joined at a moderator's power, beside the host.
    let room = room_named(&env, &room_name).await;
    let s = state(&env, &room).await;
    assert_eq!(membership(&s, &guest_id), "join", "the guest");
    assert_eq!(power(&s, &guest_id), 50, "the guest: Moderator");
    assert_eq!(membership(&s, &host_id), "join", "the host");
    assert_eq!(power(&s, &host_id), 100, "the host: Admin");

    // The guest's tenant sees the grant used: one permission, from the host's namespace.
    let grant = wait_for("the grant's use counted", || async {
        let g = env.api::<MatrixUserGrant>(1).get(&grant_name).await.ok()?;
        (g.status.as_ref()?.permissions == 1).then_some(g)
    })
    .await;
    let status = grant.status.unwrap();
    assert_eq!(status.used_by.len(), 1, "{:?}", status.used_by);
    assert_eq!(status.used_by[0].namespace, host_ns);
    assert_eq!(status.used_by[0].permissions, 1);

    // Withdrawn: the grant and the permission deleted, the guest out of the
    // room within seconds; the host stays.
    let withdrawn = run_example(&env, "invite-guest", &invite(&["--withdraw"])).await;
    assert!(withdrawn.ok, "the kit failed: {}", withdrawn.stderr);
    assert_eq!(
        withdrawn.removed,
        vec![grant_name.clone(), perm_name.clone()]
    );
    assert!(withdrawn.written.is_empty());
    // Out first, then its power level goes (a kick never waits behind the
    // power-levels write).
    wait_for("the guest out of the room, without power", || async {
        let s = state(&env, &room).await;
        (membership(&s, &guest_id) == "leave" && power(&s, &guest_id) == 0).then_some(())
    })
    .await;
    env.wait_gone(&env.api::<MatrixUserGrant>(1), &grant_name)
        .await;
    env.wait_gone(&env.api::<RoomPermission>(0), &perm_name)
        .await;
    let s = state(&env, &room).await;
    assert_eq!(membership(&s, &host_id), "join", "the host stays");
    assert_eq!(power(&s, &guest_id), 0, "the guest's power gone");
    // The guest's account is theirs, untouched.
    env.wait_condition::<MatrixUser>(1, guest, true, "Converged")
        .await;
}

/// The kit as the npm registry would serve it: `npm pack`, then installed
/// with its peer `@kubernetes/client-node` in a scratch project, where its
/// exports load. The package holds the build and the sources, nothing else.
#[tokio::test]
async fn kit_packs_and_installs_in_a_scratch_project() {
    let kit = built_kit();
    let scratch = std::env::temp_dir().join(unique("kit-pack"));
    std::fs::create_dir_all(&scratch).unwrap();
    let npm = |args: &[&str], dir: &std::path::Path| {
        let out = Command::new("npm")
            .args(args)
            .args([
                "--prefer-offline",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ])
            .current_dir(dir)
            .output()
            .expect("npm");
        assert!(
            out.status.success(),
            "npm {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Built once by `built_kit`: no prepack rebuild under the other tests' feet.
    let packed = npm(
        &[
            "pack",
            "--ignore-scripts",
            "--json",
            "--pack-destination",
            scratch.to_str().unwrap(),
        ],
        &kit,
    );
    let packed: Value = serde_json::from_str(&packed).expect("npm pack --json");
    let files: Vec<&str> = packed[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for needed in [
        "package.json",
        "README.md",
        "dist/src/index.js",
        "dist/src/index.d.ts",
        "src/health.ts",
    ] {
        assert!(files.contains(&needed), "{needed} not packed: {files:?}");
    }
    assert!(
        files
            .iter()
            .all(|f| !f.contains("test") && !f.starts_with("node_modules")),
        "{files:?}"
    );
    let tarball = scratch.join(packed[0]["filename"].as_str().unwrap());

    std::fs::write(
        scratch.join("package.json"),
        r#"{"name": "scratch", "private": true, "type": "module"}"#,
    )
    .unwrap();
    npm(
        &[
            "install",
            tarball.to_str().unwrap(),
            "@kubernetes/client-node@~1.4.0",
        ],
        &scratch,
    );
    let out = Command::new("node")
        .args([
            "--input-type=module",
            "-e",
            r#"import * as kit from "@openmeet/matrix-operator-client";
               const room = { kind: "MatrixRoom", metadata: { generation: 1 },
                 status: { observedGeneration: 1, conditions: [{ type: "Ready", status: "True", reason: "Converged", observedGeneration: 1 }] } };
               console.log(JSON.stringify({ health: kit.health(room).status,
                 client: typeof kit.MatrixPlatformClient.fromKubeConfig, name: kit.roomObjectName("Event", "x") }));"#,
        ])
        .current_dir(&scratch)
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["health"], "Current");
    assert_eq!(seen["client"], "function");
    assert_eq!(seen["name"], "event-x");

    // Its typed sidecar client, against the stack's sidecar.
    let stack = Stack::get();
    let sidecar = stack.sidecar().await;
    let token = crate::sidecar::platform_token(&unique("subject"), &unique("no-such-tenant"));
    let free = unique("free");
    let out = tokio::process::Command::new("node")
        .args([
            "--input-type=module",
            "-e",
            r#"import { SidecarClient, SidecarError } from "@openmeet/matrix-operator-client";
               const [base, token, free] = process.argv.slice(1);
               const client = new SidecarClient(base);
               const handles = {};
               for (const h of [free, "admin", "_bad"]) handles[h] = await client.handle(token, h);
               let refusal;
               try { await client.credentials(token); } catch (e) {
                 refusal = e instanceof SidecarError ? { status: e.status, code: e.code } : String(e);
               }
               console.log(JSON.stringify({ handles, refusal }));"#,
            sidecar,
            &token,
            &free,
        ])
        .env("NODE_EXTRA_CA_CERTS", stack.var("STACK_CA"))
        .current_dir(&scratch)
        .output()
        .await
        .expect("node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["handles"][&free], json!({"status": "available"}));
    assert_eq!(seen["handles"]["admin"], json!({"status": "reserved"}));
    assert_eq!(seen["handles"]["_bad"]["status"], "invalid");
    assert_eq!(
        seen["refusal"],
        json!({"status": 404, "code": "unknown_tenant"}),
        "a refusal as the sidecar's code"
    );
    let _ = std::fs::remove_dir_all(scratch);
}
