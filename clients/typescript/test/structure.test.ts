// Unit tests of the group, event and direct-conversation specs.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  desiredObject,
  directRoom,
  directRoomObjectName,
  directRoomSpec,
  eventRoomSpec,
  GROUP_CHAT_ORDER,
  groupChatSpec,
  groupRoomNames,
  groupSpaceAlias,
  groupSpaceObjectName,
  groupSpaceSpec,
  roomAlias,
  roomObjectName,
} from "../src/index.js";

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const ALIAS = /^[a-z0-9][a-z0-9._=-]*$/;

test("a group is a space with its chat room as the first, suggested child", () => {
  const group = { slug: "rust-berlin", name: "Rust Berlin" };
  assert.deepEqual(groupRoomNames("rust-berlin"), { space: "space-rust-berlin", chat: "group-rust-berlin" });
  assert.deepEqual(groupSpaceSpec("acme", group), {
    alias: "acme.space.rust-berlin",
    name: "Rust Berlin",
    topic: undefined,
    avatarUrl: undefined,
    type: "Space",
    source: { kind: "Group", slug: "rust-berlin" },
  });
  const chat = groupChatSpec("acme", group);
  assert.equal(chat.alias, roomAlias("acme", "Group", "rust-berlin"), "the group room's alias as before spaces");
  assert.equal(chat.type, undefined, "the chat is an ordinary room");
  assert.deepEqual(chat.parentRef, { name: "space-rust-berlin", order: GROUP_CHAT_ORDER, suggested: true });
  assert.equal(chat.joinRule, "restricted");
  // The chat sorts before events ordered by date.
  assert.ok(GROUP_CHAT_ORDER < "2026-03-14" && GROUP_CHAT_ORDER < "0001");
});

test("space names and aliases are distinct from every other room's and fit", () => {
  assert.notEqual(groupSpaceAlias("acme", "x"), roomAlias("acme", "Group", "x"));
  assert.notEqual(groupSpaceAlias("acme", "x"), roomAlias("acme", "Event", "x"));
  assert.notEqual(groupSpaceAlias("a-space-b", "c"), groupSpaceAlias("a", "b-space-c"));
  assert.notEqual(groupSpaceObjectName("x"), roomObjectName("Group", "x"));
  assert.notEqual(groupSpaceObjectName("Rust"), groupSpaceObjectName("rust"));
  for (const slug of ["Rust Berlin!", "s".repeat(300), "ß"]) {
    const name = groupSpaceObjectName(slug);
    assert.match(name, DNS_LABEL, name);
    assert.ok(name.length <= 63, name);
    const alias = groupSpaceAlias("Acme Corp", slug);
    assert.match(alias, ALIAS, alias);
    assert.ok(alias.length <= 128, alias);
  }
});

test("an event of a group is a restricted child of the group's space", () => {
  const spec = eventRoomSpec(
    "acme",
    { slug: "rust-berlin-march", name: "March meetup" },
    { group: "rust-berlin", order: "2026-03-14", suggested: true },
  );
  assert.equal(spec.alias, "acme.event.rust-berlin-march");
  assert.deepEqual(spec.source, { kind: "Event", slug: "rust-berlin-march" });
  assert.deepEqual(spec.parentRef, { name: "space-rust-berlin", order: "2026-03-14", suggested: true });
  assert.equal(spec.joinRule, "restricted");
  // order and suggested are optional, and absent from the applied object.
  const bare = desiredObject("MatrixRoom", "ns", "event-x", eventRoomSpec("acme", { slug: "x" }, { group: "g" }));
  assert.deepEqual(bare.spec, {
    alias: "acme.event.x",
    source: { kind: "Event", slug: "x" },
    parentRef: { name: "space-g" },
    joinRule: "restricted",
  });
  // Without a group: an ordinary room, no parent, the default join rule.
  const alone = desiredObject("MatrixRoom", "ns", "event-x", eventRoomSpec("acme", { slug: "x" }));
  assert.deepEqual(alone.spec, { alias: "acme.event.x", source: { kind: "Event", slug: "x" } });
});

test("a direct conversation is a Direct room of exactly the two users", () => {
  const room = directRoom("acme", "user-bob", "user-alice");
  assert.equal(room.name, directRoomObjectName("user-alice", "user-bob"));
  assert.deepEqual(room, directRoom("acme", "user-alice", "user-bob"), "whichever way round");
  assert.deepEqual(room.spec, {
    alias: `acme.dm.${room.name.slice(3)}`,
    source: { kind: "Direct", slug: room.name.slice(3) },
  });
  assert.equal(room.spec.encrypted, undefined, "encrypted by the operator's default for Direct rooms");
  assert.equal(room.spec.type, undefined);
  assert.deepEqual(room.members, [
    { user: "user-alice", role: "Member" },
    { user: "user-bob", role: "Member" },
  ]);
  assert.equal(directRoomSpec("acme", "user-a", "user-b", { encrypted: false }).encrypted, false);
  assert.throws(() => directRoom("acme", "user-alice", "user-alice"), /two different users/);
  assert.throws(() => directRoom("acme", "user-alice", ""), /non-empty/);
});
