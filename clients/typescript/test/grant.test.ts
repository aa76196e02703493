// Unit tests of grants and of permissions naming a user of another namespace.
import { test } from "node:test";
import assert from "node:assert/strict";
import type { KubernetesObject, KubernetesObjectApi } from "@kubernetes/client-node";
import {
  desiredObject,
  MatrixPlatformClient,
  permissionObjectName,
  USER_LABEL,
  USER_NAMESPACE_LABEL,
  userGrantObjectName,
  userGrantSpec,
} from "../src/index.js";

test("a grant's spec lists namespaces and names once, in order", () => {
  assert.deepEqual(
    userGrantSpec({
      from: ["openmeet-globex", "openmeet-acme", "openmeet-globex"],
      users: { names: ["user-dana", "user-carl", "user-dana"] },
      maxRole: "Moderator",
    }),
    {
      from: [{ namespace: "openmeet-acme" }, { namespace: "openmeet-globex" }],
      users: { names: ["user-carl", "user-dana"] },
      maxRole: "Moderator",
    },
  );
  // Every user, any role up to Admin: only the namespaces are written.
  const all = desiredObject("MatrixUserGrant", "openmeet-partner", "grant-x", userGrantSpec({ from: ["openmeet-acme"] }));
  assert.deepEqual(all, {
    apiVersion: "matrix.openmeet.net/v1alpha1",
    kind: "MatrixUserGrant",
    metadata: { name: "grant-x", namespace: "openmeet-partner", labels: {} },
    spec: { from: [{ namespace: "openmeet-acme" }] },
  });
  const selected = userGrantSpec({
    from: ["openmeet-acme"],
    users: { selector: { matchLabels: { "openmeet.net/speaker": "true" } } },
  });
  assert.deepEqual(selected.users, { selector: { matchLabels: { "openmeet.net/speaker": "true" } } });
});

test("a grant refuses what admission would, and a selector that covers everyone", () => {
  assert.throws(() => userGrantSpec({ from: [] }), /1 to 64 namespaces, not 0/);
  assert.throws(() => userGrantSpec({ from: ["Acme"] }), /not a DNS label/);
  assert.throws(() => userGrantSpec({ from: ["a"], users: { names: [] } }), /1 to 1000 users, not 0/);
  assert.throws(() => userGrantSpec({ from: ["a"], users: { selector: {} } }), /empty selector covers every user/);
  assert.throws(
    () => userGrantSpec({ from: ["a"], users: { names: ["x"], selector: { matchLabels: { a: "b" } } } as never }),
    /either names or a selector/,
  );
});

test("a permission for a user of another namespace has a name of its own", () => {
  assert.equal(permissionObjectName("event-x", "user-dana", "openmeet-partner"), "event-x.openmeet-partner.user-dana");
  assert.notEqual(
    permissionObjectName("event-x", "user-dana", "openmeet-partner"),
    permissionObjectName("event-x", "user-dana"),
  );
  assert.throws(() => permissionObjectName("event-x", "user-dana", "Partner"), /user namespace "Partner" is not a DNS label/);
  assert.equal(userGrantObjectName("acme-rust-meetup-2026"), "grant-acme-rust-meetup-2026");
  assert.match(userGrantObjectName("Acme: Rust Meetup"), /^grant-acme-rust-meetup-[0-9a-f]{10}$/);
});

/** A client over a fake API that records what it is asked and lists `listed`. */
function recording(listed: Record<string, string[]> = {}) {
  const calls: { verb: string; namespace?: string; object?: KubernetesObject; selector?: string; name?: string }[] = [];
  const api = {
    patch: async (object: KubernetesObject) => {
      calls.push({ verb: "apply", object });
      return object;
    },
    list: async (
      _apiVersion: string,
      _kind: string,
      namespace: string,
      ...rest: (string | boolean | undefined)[]
    ) => {
      const selector = rest[4] as string;
      calls.push({ verb: "list", namespace, selector });
      const names = listed[`${namespace} ${selector}`] ?? [];
      return { items: names.map((name) => ({ metadata: { name } })) };
    },
    delete: async (object: KubernetesObject) => {
      calls.push({ verb: "delete", namespace: object.metadata?.namespace, name: object.metadata?.name });
      return {};
    },
  };
  return { calls, client: new MatrixPlatformClient(api as unknown as KubernetesObjectApi) };
}

test("a member of another namespace is named with it, and labelled so", async () => {
  const { calls, client } = recording();
  await client.applyPermission("openmeet-acme", "event-x", {
    user: "user-dana",
    namespace: "openmeet-partner",
    role: "Moderator",
  });
  // The room's own namespace named explicitly is no crossing.
  await client.applyPermission("openmeet-acme", "event-x", { user: "user-alice", namespace: "openmeet-acme" });
  const [guest, own] = calls.map((c) => c.object);
  assert.deepEqual(guest?.metadata, {
    name: "event-x.openmeet-partner.user-dana",
    namespace: "openmeet-acme",
    labels: {
      "matrix.openmeet.net/room": "event-x",
      [USER_LABEL]: "user-dana",
      [USER_NAMESPACE_LABEL]: "openmeet-partner",
      "app.kubernetes.io/managed-by": "openmeet-platform",
    },
  });
  assert.deepEqual((guest as { spec?: object }).spec, {
    roomRef: { name: "event-x" },
    userRef: { name: "user-dana", namespace: "openmeet-partner" },
    role: "Moderator",
  });
  assert.equal(own?.metadata?.name, "event-x.user-alice");
  assert.deepEqual((own as { spec?: object }).spec, { roomRef: { name: "event-x" }, userRef: { name: "user-alice" } });
  assert.equal(own?.metadata?.labels?.[USER_NAMESPACE_LABEL], undefined);
});

test("a user carries the labels a grant's selector matches", async () => {
  const { calls, client } = recording();
  await client.applyUser("openmeet-partner", "user-dana", { localpart: "dana" }, { "openmeet.net/speaker": "true" });
  assert.deepEqual(calls[0]?.object?.metadata?.labels, {
    "openmeet.net/speaker": "true",
    "app.kubernetes.io/managed-by": "openmeet-platform",
  });
});

test("a grant is applied in the users' namespace, never admitting its own", async () => {
  const { calls, client } = recording();
  const spec = userGrantSpec({ from: ["openmeet-acme"], users: { names: ["user-dana"] }, maxRole: "Moderator" });
  await client.applyUserGrant("openmeet-partner", "grant-acme", spec);
  assert.equal(calls[0]?.object?.kind, "MatrixUserGrant");
  assert.equal(calls[0]?.object?.metadata?.namespace, "openmeet-partner");
  await assert.rejects(client.applyUserGrant("openmeet-acme", "grant-acme", spec), /a grant lives in the users' namespace/);
  assert.equal(calls.length, 1, "nothing written");
});

test("deleting a user deletes its own permissions, and those naming it from elsewhere when asked", async () => {
  const own = "matrix.openmeet.net/user=user-dana,!matrix.openmeet.net/user-namespace,app.kubernetes.io/managed-by=openmeet-platform";
  const guest =
    "matrix.openmeet.net/user=user-dana,matrix.openmeet.net/user-namespace=openmeet-partner,app.kubernetes.io/managed-by=openmeet-platform";
  const { calls, client } = recording({
    [`openmeet-partner ${own}`]: ["space-x.user-dana"],
    [`openmeet-acme ${guest}`]: ["event-x.openmeet-partner.user-dana"],
  });
  await client.deleteUser("openmeet-partner", "user-dana", { referencedFrom: ["openmeet-acme", "openmeet-partner"] });
  assert.deepEqual(
    calls.filter((c) => c.verb === "delete").map((c) => `${c.namespace}/${c.name}`),
    ["openmeet-partner/user-dana", "openmeet-partner/space-x.user-dana", "openmeet-acme/event-x.openmeet-partner.user-dana"],
  );
  // Without referencedFrom, only the user's namespace is listed.
  const plain = recording();
  await plain.client.deleteUser("openmeet-partner", "user-dana");
  assert.deepEqual(
    plain.calls.filter((c) => c.verb === "list").map((c) => c.namespace),
    ["openmeet-partner"],
  );
});
