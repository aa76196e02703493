// OpenMeet roles to RoomPermission roles (docs/platform.md, "Mapping").
import type { RoomPermissionSpec } from "./generated/crds.js";

/** A RoomPermission's named role: Member = 0, Moderator = 50, Admin = 100. */
export type Role = NonNullable<RoomPermissionSpec["role"]>;
/** Join (default), Invite or Ban. */
export type Membership = NonNullable<RoomPermissionSpec["membership"]>;

/** Roles of an event's people. */
export type EventRole = "host" | "moderator" | "attendee";
/** Roles of a group's members. */
export type GroupRole = "owner" | "admin" | "member";

/**
 * The event's host owns the room (Admin, 100), its moderators moderate
 * (Moderator, 50: kick, ban, redact), attendees talk (Member, 0).
 */
export const EVENT_ROLES: Readonly<Record<EventRole, Role>> = {
  host: "Admin",
  moderator: "Moderator",
  attendee: "Member",
};

/** The group's owner is Admin, its admins moderate, members talk. */
export const GROUP_ROLES: Readonly<Record<GroupRole, Role>> = {
  owner: "Admin",
  admin: "Moderator",
  member: "Member",
};

/** The power level a role stands for. */
export const ROLE_POWER: Readonly<Record<Role, number>> = {
  Member: 0,
  Moderator: 50,
  Admin: 100,
};

/** The role of an event person or group member, refusing unknown roles. */
export function roleFor(source: "Event" | "Group", role: string): Role {
  const table: Readonly<Record<string, Role>> = source === "Event" ? EVENT_ROLES : GROUP_ROLES;
  const mapped = Object.hasOwn(table, role) ? table[role] : undefined;
  if (!mapped) {
    throw new Error(
      `unknown ${source.toLowerCase()} role ${JSON.stringify(role)} (known: ${Object.keys(table).join(", ")})`,
    );
  }
  return mapped;
}
