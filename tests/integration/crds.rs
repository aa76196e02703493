//! The CRDs at admission: samples are accepted, invalid objects rejected by
//! schema or CEL, immutable and one-way fields enforced, printer columns served.

use crate::harness::TestEnv;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::Api;
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, MatrixUserGrant, RoomPermission};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

fn resource_for(kind: &str) -> ApiResource {
    match kind {
        "MatrixUser" => ApiResource::erase::<MatrixUser>(&()),
        "MatrixRoom" => ApiResource::erase::<MatrixRoom>(&()),
        "RoomPermission" => ApiResource::erase::<RoomPermission>(&()),
        "MatrixUserGrant" => ApiResource::erase::<MatrixUserGrant>(&()),
        other => panic!("unexpected kind {other}"),
    }
}

/// Every YAML document in the files of `dir`, with its file name.
fn documents(dir: &str) -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut docs = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap();
            if !value.is_null() {
                docs.push((
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    value,
                ));
            }
        }
    }
    docs
}

fn api_for(env: &TestEnv, doc: &Value) -> Api<DynamicObject> {
    Api::namespaced_with(
        env.client.clone(),
        env.ns(0),
        &resource_for(doc["kind"].as_str().unwrap()),
    )
}

fn object(env: &TestEnv, doc: &Value) -> DynamicObject {
    let mut doc = doc.clone();
    doc["metadata"]["namespace"] = json!(env.ns(0));
    serde_json::from_value(doc).unwrap()
}

#[tokio::test]
async fn every_sample_is_accepted() {
    let env = TestEnv::with(
        "samples",
        crate::harness::Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let docs = documents("config/samples");
    let mut applied = 0;
    for (file, doc) in &docs {
        if doc["kind"] == "Namespace" {
            continue;
        }
        let obj = object(&env, doc);
        api_for(&env, doc)
            .patch(
                obj.metadata.name.as_deref().unwrap(),
                &PatchParams::apply("crd-test"),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("sample {file} rejected: {e}"));
        applied += 1;
    }
    assert!(applied >= 5, "samples cover every kind: applied {applied}");
}

#[tokio::test]
async fn invalid_objects_are_rejected_at_admission() {
    let env = TestEnv::with(
        "invalid",
        crate::harness::Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let docs = documents("tests/fixtures/invalid");
    assert!(docs.len() >= 10);
    for (file, doc) in &docs {
        let result = api_for(&env, doc)
            .create(&PostParams::default(), &object(&env, doc))
            .await;
        match result {
            Err(kube::Error::Api(status)) if status.code == 422 => {}
            other => panic!("{file} should be rejected with 422 Invalid, got {other:?}"),
        }
    }
}

async fn expect_rejected(api: &Api<DynamicObject>, name: &str, patch: Value, rule: &str) {
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{rule}: {status:?}");
            assert!(
                status.message.contains(rule),
                "message names the rule ({rule}): {}",
                status.message
            );
        }
        other => panic!("change should be rejected by '{rule}', got {other:?}"),
    }
}

#[tokio::test]
async fn immutable_and_one_way_fields_are_enforced() {
    let env = TestEnv::with(
        "cel",
        crate::harness::Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let create = |kind: &str, name: &str, spec: Value| json!({"apiVersion": "matrix.openmeet.net/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec});
    let user = create("MatrixUser", "u", json!({"localpart": "immutable-user"}));
    let room = create(
        "MatrixRoom",
        "r",
        json!({"alias": "immutable-room", "encrypted": true}),
    );
    let perm = create(
        "RoomPermission",
        "p",
        json!({"roomRef": {"name": "r"}, "userRef": {"name": "u"}}),
    );
    for doc in [&user, &room, &perm] {
        api_for(&env, doc)
            .create(&PostParams::default(), &object(&env, doc))
            .await
            .unwrap();
    }
    expect_rejected(
        &api_for(&env, &user),
        "u",
        json!({"spec": {"localpart": "other"}}),
        "localpart is immutable",
    )
    .await;
    expect_rejected(
        &api_for(&env, &room),
        "r",
        json!({"spec": {"alias": "other"}}),
        "alias is immutable",
    )
    .await;
    expect_rejected(
        &api_for(&env, &room),
        "r",
        json!({"spec": {"encrypted": false}}),
        "encryption cannot be turned off",
    )
    .await;
    expect_rejected(
        &api_for(&env, &perm),
        "p",
        json!({"spec": {"roomRef": {"name": "x"}}}),
        "roomRef is immutable",
    )
    .await;

    // A room's type never changes, either way; a Direct room is encrypted
    // by default, and that too is one way.
    let space = create(
        "MatrixRoom",
        "space",
        json!({"alias": "immutable-space", "type": "Space"}),
    );
    let direct = create(
        "MatrixRoom",
        "direct",
        json!({"alias": "immutable-direct", "source": {"kind": "Direct", "slug": "d"}}),
    );
    for doc in [&space, &direct] {
        api_for(&env, doc)
            .create(&PostParams::default(), &object(&env, doc))
            .await
            .unwrap();
    }
    expect_rejected(
        &api_for(&env, &space),
        "space",
        json!({"spec": {"type": null}}),
        "type is immutable",
    )
    .await;
    expect_rejected(
        &api_for(&env, &room),
        "r",
        json!({"spec": {"type": "Space"}}),
        "type is immutable",
    )
    .await;
    expect_rejected(
        &api_for(&env, &direct),
        "direct",
        json!({"spec": {"encrypted": false}}),
        "encryption cannot be turned off",
    )
    .await;

    // Deactivation is permanent: neither `false` nor removing the field undoes it.
    let gone = create(
        "MatrixUser",
        "gone",
        json!({"localpart": "deactivated-user", "deactivated": true}),
    );
    api_for(&env, &gone)
        .create(&PostParams::default(), &object(&env, &gone))
        .await
        .unwrap();
    for patch in [json!({"deactivated": false}), json!({"deactivated": null})] {
        expect_rejected(
            &api_for(&env, &gone),
            "gone",
            json!({ "spec": patch }),
            "deactivation is permanent",
        )
        .await;
    }

    // Mutable fields still change.
    api_for(&env, &user)
        .patch(
            "u",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"displayName": "Fine"}})),
        )
        .await
        .unwrap();
    // Deactivation turns on from off.
    api_for(&env, &user)
        .patch(
            "u",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deactivated": true}})),
        )
        .await
        .unwrap();
    // Encryption turns on from off.
    let plain = create("MatrixRoom", "plain", json!({"alias": "plain-room"}));
    api_for(&env, &plain)
        .create(&PostParams::default(), &object(&env, &plain))
        .await
        .unwrap();
    api_for(&env, &plain)
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"encrypted": true}})),
        )
        .await
        .unwrap();
}

/// Display names, room names and topics refuse control characters and bidi
/// overrides/isolates (each range's edges), and keep accepting any other text.
#[tokio::test]
async fn text_fields_refuse_control_and_bidi_characters_only() {
    let env = TestEnv::with(
        "text",
        crate::harness::Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let doc = |kind: &str, name: &str, spec: Value| json!({"apiVersion": "matrix.openmeet.net/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec});
    let with_text = |field: &str, text: &str, i: usize| match field {
        "displayName" => doc(
            "MatrixUser",
            &format!("u{i}"),
            json!({"localpart": format!("text-{i}"), "displayName": text}),
        ),
        _ => doc(
            "MatrixRoom",
            &format!("r{i}"),
            json!({"alias": format!("text-{i}"), field: text}),
        ),
    };
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let refused = [
        '\u{0}', '\u{9}', '\n', '\u{1b}', '\u{1f}', '\u{7f}', '\u{80}', '\u{85}', '\u{9f}',
        '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}',
    ];
    let accepted = [
        "Zoë Ångström",
        "Ольга Петрова",
        "李小龙",
        "مريم الحربي",
        "👩🏽‍💻 Dev ☕",
        "A\u{a0}B \u{202f}C \u{2065}\u{206a}",
    ];
    let mut i = 0;
    for field in ["displayName", "name", "topic"] {
        for c in refused {
            i += 1;
            let d = with_text(field, &format!("Alice{c}Bob"), i);
            match api_for(&env, &d).create(&dry_run, &object(&env, &d)).await {
                Err(kube::Error::Api(status)) => {
                    assert_eq!(status.code, 422, "{field} with U+{:04X}", c as u32);
                    assert!(
                        status.message.contains(&format!("spec.{field}")),
                        "{field} with U+{:04X} refused for its text: {}",
                        c as u32,
                        status.message
                    );
                }
                other => panic!("{field} with U+{:04X} accepted: {other:?}", c as u32),
            }
        }
        for text in accepted {
            i += 1;
            let d = with_text(field, text, i);
            let created = api_for(&env, &d)
                .create(&PostParams::default(), &object(&env, &d))
                .await
                .unwrap_or_else(|e| panic!("{field} {text:?} refused: {e}"));
            assert_eq!(created.data["spec"][field], text, "stored as sent");
        }
    }
}

/// Property paths under `schema` that carry no description.
fn undescribed(schema: &Value, path: &str, missing: &mut Vec<String>) {
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            let here = format!("{path}.{name}");
            // apiVersion, kind and metadata are the API server's own.
            let own =
                path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name.as_str());
            let described = property["description"]
                .as_str()
                .is_some_and(|d| !d.trim().is_empty());
            if !described && !own {
                missing.push(here.clone());
            }
            undescribed(property, &here, missing);
        }
    }
    if schema["items"].is_object() {
        undescribed(&schema["items"], &format!("{path}[]"), missing);
    }
}

/// `kubectl explain` has something to say about every field: each property
/// of each served CRD's schema has a description, enums and defaults are
/// explained in words, and `get` shows the REASON and `-o wide` columns.
#[tokio::test]
async fn every_field_is_described_and_columns_explain() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let env = TestEnv::with(
        "explain",
        crate::harness::Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for plural in [
        "matrixusers",
        "matrixrooms",
        "roompermissions",
        "matrixusergrants",
    ] {
        let crd = crds
            .get(&format!("{plural}.matrix.openmeet.net"))
            .await
            .unwrap();
        let version = &serde_json::to_value(&crd.spec.versions[0]).unwrap();
        let schema = &version["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        undescribed(schema, "", &mut missing);
        assert!(
            missing.is_empty(),
            "{plural}: no description for {missing:?}"
        );
        // Every enum with more than one value says what each value means,
        // and every default is named in the description.
        let mut vague = Vec::new();
        fn words(schema: &Value, path: &str, vague: &mut Vec<String>) {
            let description = schema["description"].as_str().unwrap_or_default();
            for value in schema["enum"].as_array().into_iter().flatten() {
                let value = value.as_str().unwrap_or_default();
                if !description.contains(value) {
                    vague.push(format!("{path}: enum value {value}"));
                }
            }
            if let Some(default) = schema["default"].as_str() {
                if !description.contains("default") || !description.contains(default) {
                    vague.push(format!("{path}: default {default}"));
                }
            }
            for (name, property) in schema["properties"].as_object().into_iter().flatten() {
                words(property, &format!("{path}.{name}"), vague);
            }
            if schema["items"].is_object() {
                words(&schema["items"], &format!("{path}[]"), vague);
            }
        }
        words(&schema["properties"]["spec"], "spec", &mut vague);
        assert!(vague.is_empty(), "{plural}: {vague:?}");

        let columns = version["additionalPrinterColumns"].as_array().unwrap();
        assert!(
            columns.iter().any(|c| c["name"] == "Reason"
                && c["jsonPath"] == r#".status.conditions[?(@.type=="Ready")].reason"#),
            "{plural}: no Reason column"
        );
        assert!(
            columns.iter().any(|c| c["priority"] == 1),
            "{plural}: -o wide adds nothing"
        );
    }

    // What a person sees.
    let stack = crate::harness::Stack::get();
    let kubectl = |args: Vec<String>| {
        let out = std::process::Command::new(stack.var("KUBECTL"))
            .args(&args)
            .env("KUBECONFIG", stack.var("KUBECONFIG"))
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    for field in [
        "roompermission.spec.membership",
        "roompermission.status.effectivePowerLevel",
        "matrixroom.spec.source.kind",
        "matrixroom.spec.permissions.kick",
        "matrixroom.status.joinedMembers",
    ] {
        let explained = kubectl(vec!["explain".into(), field.into()]);
        assert!(
            !explained.contains("<no description>"),
            "kubectl explain {field}:\n{explained}"
        );
    }
    let room = json!({"apiVersion": "matrix.openmeet.net/v1alpha1", "kind": "MatrixRoom",
        "metadata": {"name": "wide"}, "spec": {"alias": "wide-room", "source": {"kind": "Group", "slug": "hikers"}}});
    api_for(&env, &room)
        .create(&PostParams::default(), &object(&env, &room))
        .await
        .unwrap();
    let wide = kubectl(vec![
        "-n".into(),
        env.ns(0).into(),
        "get".into(),
        "mxroom".into(),
        "-o".into(),
        "wide".into(),
    ]);
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    for column in ["REASON", "SOURCE", "SLUG", "MEMBERSHIP", "DELETION"] {
        assert!(header.contains(&column), "{column} missing in:\n{wide}");
    }
    assert!(
        wide.contains("Group") && wide.contains("hikers") && wide.contains("Close"),
        "{wide}"
    );
}
