// Naming rules for the objects the platform writes (docs/platform.md,
// "Naming"). Pure functions: the unit tests in test/naming.test.ts pin them.
//
// Two scopes:
// - Object names are per namespace, and a namespace is one tenant: they only
//   have to be unique inside the tenant. They are DNS labels (<= 63
//   characters), so they also fit in label values.
// - Room aliases and user localparts are global to the homeserver, across
//   every tenant: the oldest claim wins and the others are refused
//   (`AliasConflict`, `LocalpartConflict`). Aliases are made by the platform,
//   so they carry the tenant; localparts are the users' own handles,
//   checked with the sidecar's handle API before they are written.
//
// Every name is injective: a value that had to be changed to fit the grammar
// (upper case, other characters, too long) gets a hash of the original
// appended, so "Foo" and "foo" never share a room.
import { createHash } from "node:crypto";

/** The label that maps a namespace to its tenant. */
export const TENANT_LABEL = "matrix.openmeet.net/tenant";
/** Labels the kit puts on permissions, so a room's or user's can be listed. */
export const ROOM_LABEL = "matrix.openmeet.net/room";
export const USER_LABEL = "matrix.openmeet.net/user";
/** On a permission naming a user of another namespace: that namespace. */
export const USER_NAMESPACE_LABEL = "matrix.openmeet.net/user-namespace";

/** The platform entity a room belongs to. */
export type SourceKind = "Event" | "Group" | "Direct";

const MAX_OBJECT_NAME = 63;
const MAX_ALIAS = 128;
const HASH_LENGTH = 10;

function hash(value: string): string {
  return createHash("sha256").update(value, "utf8").digest("hex").slice(0, HASH_LENGTH);
}

/** Lower case, runs of anything but [a-z0-9] turned into one `-`, trimmed. */
function clean(value: string): string {
  return value
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "");
}

/**
 * `prefix` + the cleaned value, at most `max` characters. When cleaning
 * changed the value or it had to be cut, `-<hash of the original>` is
 * appended so that distinct values keep distinct names.
 */
function fit(prefix: string, value: string, max: number): string {
  const cleaned = clean(value);
  if (cleaned === value && prefix.length + cleaned.length <= max && cleaned !== "") {
    return prefix + cleaned;
  }
  const suffix = hash(value);
  const room = max - prefix.length - suffix.length - 1;
  const head = cleaned.slice(0, Math.max(room, 0)).replace(/-+$/, "");
  return head === "" ? `${prefix}${suffix}` : `${prefix}${head}-${suffix}`;
}

function required(what: string, value: string): string {
  if (typeof value !== "string" || value.length === 0) {
    throw new Error(`${what} must be a non-empty string`);
  }
  return value;
}

/** `event-<slug>`, `group-<slug>`: the `MatrixRoom` of an event or group. */
export function roomObjectName(kind: "Event" | "Group", slug: string): string {
  return fit(`${kind.toLowerCase()}-`, required("slug", slug), MAX_OBJECT_NAME);
}

/**
 * `space-<slug>`: the group's space (`type: Space`). The group's chat room
 * keeps `group-<slug>` (`roomObjectName("Group", slug)`) and becomes a child
 * of this space, so a group room made before spaces needs no new name.
 */
export function groupSpaceObjectName(slug: string): string {
  return fit("space-", required("slug", slug), MAX_OBJECT_NAME);
}

/** `user-<subject>`: the `MatrixUser` of a platform user (its stable id). */
export function userObjectName(subject: string): string {
  return fit("user-", required("subject", subject), MAX_OBJECT_NAME);
}

/** The pair's key: the same whichever way round the users are given. */
export function directPairKey(userA: string, userB: string): string {
  required("userA", userA);
  required("userB", userB);
  if (userA === userB) throw new Error("a direct conversation needs two different users");
  const sorted = [userA, userB].sort().join("\n");
  return createHash("sha256").update(sorted, "utf8").digest("hex").slice(0, 16);
}

/** `dm-<hash>`: the `MatrixRoom` of the direct conversation of two users. */
export function directRoomObjectName(userA: string, userB: string): string {
  return `dm-${directPairKey(userA, userB)}`;
}

/**
 * `<room>.<user>`: one user's `RoomPermission` in one room. A user of
 * another namespace (`userNamespace`, admitted there by a `MatrixUserGrant`)
 * gives `<room>.<user namespace>.<user>`: three parts, so it never meets the
 * name of a permission for a user of the room's own namespace.
 */
export function permissionObjectName(roomName: string, userName: string, userNamespace?: string): string {
  const parts: [string, string][] = [
    ["room name", roomName],
    ["user name", userName],
  ];
  if (userNamespace !== undefined) parts.push(["user namespace", userNamespace]);
  for (const [what, name] of parts) {
    if (!/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(name) || name.length > MAX_OBJECT_NAME) {
      throw new Error(`${what} ${JSON.stringify(name)} is not a DNS label (use the naming helpers)`);
    }
  }
  return userNamespace === undefined ? `${roomName}.${userName}` : `${roomName}.${userNamespace}.${userName}`;
}

/**
 * `grant-<slug>`: a `MatrixUserGrant`, in the namespace of the users it
 * opens to others; the slug says what for (e.g. the inviting tenant and its
 * event: `acme-rust-meetup-2026`).
 */
export function userGrantObjectName(slug: string): string {
  return fit("grant-", required("slug", slug), MAX_OBJECT_NAME);
}

/**
 * The alias of an event's or group's room: `<tenant>.<event|group>.<slug>`,
 * global across tenants, hence the tenant. The operator maps it into its own
 * alias namespace (`#openmeet-<alias>:<server>` with the default prefix).
 * The dots separate parts that never contain one, so two tenants never get
 * the same alias.
 */
export function roomAlias(tenant: string, kind: "Event" | "Group", slug: string): string {
  const t = fit("", required("tenant", tenant), 40);
  return fit(`${t}.${kind.toLowerCase()}.`, required("slug", slug), MAX_ALIAS);
}

/** The alias of a group's space: `<tenant>.space.<slug>`. */
export function groupSpaceAlias(tenant: string, slug: string): string {
  const t = fit("", required("tenant", tenant), 40);
  return fit(`${t}.space.`, required("slug", slug), MAX_ALIAS);
}

/** The alias of two users' direct conversation: `<tenant>.dm.<hash>`. */
export function directRoomAlias(tenant: string, userA: string, userB: string): string {
  const t = fit("", required("tenant", tenant), 40);
  return `${t}.dm.${directPairKey(userA, userB)}`;
}

/** Why a handle cannot be a localpart, as the sidecar's handle API says it. */
export type LocalpartProblem = "length" | "characters" | "leading_underscore" | "numeric";

/**
 * Checks a user's chosen handle against the localpart grammar the CRD
 * enforces (1 to 200 of `[a-z0-9._=/+-]`, not starting with `_`, not digits
 * only: Synapse keeps those for guest accounts). Whether it
 * is free is the sidecar's handle API's to say (`GET /api/v1/handles/<h>`).
 */
export function localpartProblem(handle: string): LocalpartProblem | null {
  if (handle.length < 1 || handle.length > 200) return "length";
  if (!/^[a-z0-9._=/+-]+$/.test(handle)) return "characters";
  if (handle.startsWith("_")) return "leading_underscore";
  if (/^[0-9]+$/.test(handle)) return "numeric";
  return null;
}
