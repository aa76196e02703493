// The rooms of a group, its events and direct conversations, as specs
// (docs/platform.md, "Groups, events and direct conversations"). Pure
// functions: test/structure.test.ts pins them; the client applies them.
//
// - A group is a space, `space-<slug>` (`type: Space`, which never changes:
//   it is chosen at creation), with the group's members declared on it, and
//   a chat room `group-<slug>` as its first child: clients show a space as a
//   list of rooms, not as a conversation, so the group talks in the chat.
// - An event of a group is a child room of the group's space with the
//   `restricted` join rule: the group's members may join it from any client
//   with no permission per event; its hosts, moderators and the attendees
//   who should be joined have permissions.
// - A direct conversation is a `Direct` room of exactly two members,
//   encrypted unless the spec says otherwise.
import type { MatrixRoomSpec } from "./generated/crds.js";
import {
  directPairKey,
  directRoomAlias,
  directRoomObjectName,
  groupSpaceAlias,
  groupSpaceObjectName,
  roomAlias,
  roomObjectName,
} from "./naming.js";
import type { RoomMember } from "./client.js";

/** What the platform knows of a group or an event: its slug and its texts. */
export interface Described {
  slug: string;
  /** The room's name (a title: one line, no control characters). */
  name?: string;
  topic?: string;
  avatarUrl?: string;
}

/** Where an event sits in its group's space. */
export interface EventPlacement {
  /** The group's slug: the event becomes a child of its space. */
  group: string;
  /**
   * The event's `order` in the space (`m.space.child`): printable ASCII,
   * compared as strings. An ISO date (`2026-03-14`) lists events by date.
   */
  order?: string;
  /** Whether clients suggest the event to the group's members. */
  suggested?: boolean;
}

/**
 * The order of the group's chat room in its space: `"0"` sorts before the
 * usual orders (ISO dates, numbers), so the chat comes first.
 */
export const GROUP_CHAT_ORDER = "0";

/** `undefined` stays out of the spec (the client drops it too). */
function texts(d: Described): Pick<MatrixRoomSpec, "name" | "topic" | "avatarUrl"> {
  return { name: d.name, topic: d.topic, avatarUrl: d.avatarUrl };
}

/** The group's space: `type: Space`, alias `<tenant>.space.<slug>`. */
export function groupSpaceSpec(tenant: string, group: Described): MatrixRoomSpec {
  return {
    alias: groupSpaceAlias(tenant, group.slug),
    ...texts(group),
    type: "Space",
    source: { kind: "Group", slug: group.slug },
  };
}

/**
 * The group's chat room, `group-<slug>`: a child of the space, listed first
 * and suggested, `restricted` so the space's members may join it.
 */
export function groupChatSpec(tenant: string, group: Described): MatrixRoomSpec {
  return {
    alias: roomAlias(tenant, "Group", group.slug),
    ...texts(group),
    source: { kind: "Group", slug: group.slug },
    parentRef: { name: groupSpaceObjectName(group.slug), order: GROUP_CHAT_ORDER, suggested: true },
    joinRule: "restricted",
  };
}

/**
 * An event's room. Under a group (`placement`), a child of the group's space
 * with the `restricted` join rule; without one, an ordinary invite-only room.
 */
export function eventRoomSpec(tenant: string, event: Described, placement?: EventPlacement): MatrixRoomSpec {
  const spec: MatrixRoomSpec = {
    alias: roomAlias(tenant, "Event", event.slug),
    ...texts(event),
    source: { kind: "Event", slug: event.slug },
  };
  if (placement) {
    spec.parentRef = {
      name: groupSpaceObjectName(placement.group),
      order: placement.order,
      // `false` is the default: left out, so the applied object stays minimal.
      suggested: placement.suggested ? true : undefined,
    };
    spec.joinRule = "restricted";
  }
  return spec;
}

/** The two users (`MatrixUser` object names) of a direct conversation, in a stable order. */
function pair(userA: string, userB: string): [string, string] {
  directPairKey(userA, userB); // refuses a missing or repeated user
  return userA < userB ? [userA, userB] : [userB, userA];
}

/**
 * The direct conversation of two users (`MatrixUser` object names):
 * `source.kind: Direct`, alias `<tenant>.dm.<hash of the pair>`. Encryption
 * is left to the operator's default for Direct rooms (on); `encrypted: false`
 * in `extra` turns it off at creation (it can never be turned off later).
 */
export function directRoomSpec(
  tenant: string,
  userA: string,
  userB: string,
  extra: Pick<MatrixRoomSpec, "name" | "topic" | "encrypted"> = {},
): MatrixRoomSpec {
  pair(userA, userB);
  return {
    alias: directRoomAlias(tenant, userA, userB),
    ...extra,
    source: { kind: "Direct", slug: directPairKey(userA, userB) },
  };
}

/** The room of a direct conversation, with its exactly two members (both joined, power 0). */
export function directRoom(
  tenant: string,
  userA: string,
  userB: string,
  extra: Pick<MatrixRoomSpec, "name" | "topic" | "encrypted"> = {},
): { name: string; spec: MatrixRoomSpec; members: RoomMember[] } {
  const users = pair(userA, userB);
  return {
    name: directRoomObjectName(userA, userB),
    spec: directRoomSpec(tenant, userA, userB, extra),
    members: users.map((user) => ({ user, role: "Member" as const })),
  };
}

/** The object names of a group's rooms: the space and its chat. */
export function groupRoomNames(slug: string): { space: string; chat: string } {
  return { space: groupSpaceObjectName(slug), chat: roomObjectName("Group", slug) };
}
