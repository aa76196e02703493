// Unit tests of the pure helpers: `npm test` (node --test, no framework).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  desiredObject,
  directRoomAlias,
  directRoomObjectName,
  localpartProblem,
  permissionObjectName,
  roleFor,
  ROLE_POWER,
  roomAlias,
  roomObjectName,
  userObjectName,
} from "../src/index.js";

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const ALIAS = /^[a-z0-9][a-z0-9._=-]*$/;

test("clean slugs name objects as they are", () => {
  assert.equal(roomObjectName("Event", "rust-meetup-2026"), "event-rust-meetup-2026");
  assert.equal(roomObjectName("Group", "rustaceans"), "group-rustaceans");
  assert.equal(userObjectName("7f3c2a10-0000-4000-8000-000000000001"), "user-7f3c2a10-0000-4000-8000-000000000001");
  assert.equal(permissionObjectName("event-rust", "user-alice"), "event-rust.user-alice");
});

test("values changed to fit keep distinct names (a hash of the original)", () => {
  const upper = roomObjectName("Event", "Rust");
  const lower = roomObjectName("Event", "rust");
  assert.notEqual(upper, lower);
  assert.match(upper, /^event-rust-[0-9a-f]{10}$/);
  assert.notEqual(roomObjectName("Event", "a b"), roomObjectName("Event", "a_b"));
  assert.equal(roomObjectName("Event", "Rust"), upper, "stable");
  // Nothing left after cleaning: the hash alone.
  assert.match(userObjectName("ÄÖÜ"), /^user-[0-9a-f]{10}$/);
});

test("object names are DNS labels of at most 63 characters", () => {
  for (const slug of ["x".repeat(300), "Ünïcødé slug!", "--dashes--", "a".repeat(57), "a".repeat(58)]) {
    for (const name of [roomObjectName("Event", slug), roomObjectName("Group", slug), userObjectName(slug)]) {
      assert.match(name, DNS_LABEL, name);
      assert.ok(name.length <= 63, `${name}: ${name.length}`);
    }
  }
  assert.equal(roomObjectName("Event", "a".repeat(57)), `event-${"a".repeat(57)}`, "fits exactly");
  assert.notEqual(roomObjectName("Event", "a".repeat(100)), roomObjectName("Event", "a".repeat(101)));
});

test("aliases carry the tenant, and two tenants never share one", () => {
  assert.equal(roomAlias("acme", "Event", "rust-meetup-2026"), "acme.event.rust-meetup-2026");
  assert.equal(roomAlias("acme", "Group", "rustaceans"), "acme.group.rustaceans");
  // Dashes inside parts cannot make one tenant's alias another's.
  assert.notEqual(roomAlias("a-event-b", "Event", "c"), roomAlias("a", "Event", "b-event-c"));
  assert.notEqual(roomAlias("acme", "Event", "x"), roomAlias("acme", "Group", "x"));
  for (const [tenant, slug] of [
    ["Acme Corp", "Summer BBQ!"],
    ["t".repeat(80), "s".repeat(300)],
    ["acme", "ß"],
  ]) {
    const alias = roomAlias(tenant, "Event", slug);
    assert.match(alias, ALIAS, alias);
    assert.ok(alias.length <= 128, `${alias.length}`);
  }
});

test("a direct conversation has one name and alias whichever way round", () => {
  const ab = directRoomObjectName("user-alice", "user-bob");
  assert.equal(ab, directRoomObjectName("user-bob", "user-alice"));
  assert.match(ab, /^dm-[0-9a-f]{16}$/);
  assert.notEqual(ab, directRoomObjectName("user-alice", "user-carol"));
  assert.equal(directRoomAlias("acme", "user-bob", "user-alice"), `acme.dm.${ab.slice(3)}`);
  assert.throws(() => directRoomObjectName("user-alice", "user-alice"), /two different users/);
});

test("permission names refuse parts that are not object names", () => {
  assert.throws(() => permissionObjectName("Event Rust", "user-alice"), /not a DNS label/);
  assert.throws(() => permissionObjectName("event.rust", "user-alice"), /not a DNS label/);
  assert.throws(() => roomObjectName("Event", ""), /non-empty/);
});

test("localpart grammar as the handle API reports it", () => {
  assert.equal(localpartProblem("john.doe"), null);
  assert.equal(localpartProblem("a=b/c+d-e_f"), null);
  assert.equal(localpartProblem(""), "length");
  assert.equal(localpartProblem("x".repeat(201)), "length");
  assert.equal(localpartProblem("John"), "characters");
  assert.equal(localpartProblem("jo hn"), "characters");
  assert.equal(localpartProblem("_bot"), "leading_underscore");
  assert.equal(localpartProblem("12345"), "numeric");
  assert.equal(localpartProblem("12345a"), null);
});

test("OpenMeet roles map to RoomPermission roles", () => {
  assert.equal(roleFor("Event", "host"), "Admin");
  assert.equal(roleFor("Event", "moderator"), "Moderator");
  assert.equal(roleFor("Event", "attendee"), "Member");
  assert.equal(roleFor("Group", "owner"), "Admin");
  assert.equal(roleFor("Group", "admin"), "Moderator");
  assert.equal(roleFor("Group", "member"), "Member");
  assert.throws(() => roleFor("Event", "owner"), /unknown event role/);
  assert.throws(() => roleFor("Group", "toString"), /unknown group role/);
  assert.deepEqual(ROLE_POWER, { Member: 0, Moderator: 50, Admin: 100 });
});

test("the applied object holds only what is declared", () => {
  const object = desiredObject("RoomPermission", "ns", "event-x.user-a", {
    roomRef: { name: "event-x" },
    userRef: { name: "user-a" },
    role: "Member",
    powerLevel: undefined,
  });
  assert.deepEqual(object, {
    apiVersion: "matrix.openmeet.net/v1alpha1",
    kind: "RoomPermission",
    metadata: { name: "event-x.user-a", namespace: "ns", labels: {} },
    spec: { roomRef: { name: "event-x" }, userRef: { name: "user-a" }, role: "Member" },
  });
});
