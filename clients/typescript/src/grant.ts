// A tenant's consent that other tenants' rooms may name some of its users
// (docs/platform.md, "Members from another tenant"). Pure: test/grant.test.ts
// pins it; the client applies it.
//
// A `MatrixUserGrant` lives in the namespace of the users it opens, lists
// the namespaces whose `RoomPermission`s may name them, which users (all, by
// name, or by label) and the highest role such a permission may give. Within
// a namespace no grant is needed. Without a covering grant a permission is
// `ReferenceNotPermitted`; above its `maxRole`, `RoleNotPermitted`.
import type { MatrixUserGrantSpec } from "./generated/crds.js";

/** The label selector of a grant's `users`. */
export type UserSelector = NonNullable<NonNullable<MatrixUserGrantSpec["users"]>["selector"]>;

/** What a grant admits, as the platform decides it. */
export interface UserGrant {
  /** The namespaces whose `RoomPermission`s may name the users (at least one, others than the grant's). */
  from: string[];
  /**
   * Which `MatrixUser`s of the grant's namespace: by object name, or by a
   * label selector on their labels. Left out: every one of them.
   */
  users?: { names: string[] } | { selector: UserSelector };
  /** The highest role a permission under the grant may give: `Member`, `Moderator` or `Admin` (the default). */
  maxRole?: NonNullable<MatrixUserGrantSpec["maxRole"]>;
}

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

/** Sorted and without repeats, so the same grant always applies as the same object. */
function distinct(values: string[]): string[] {
  return [...new Set(values)].sort();
}

/**
 * The spec of a grant. Namespaces and names are sorted and deduplicated
 * (a reordered list is no change); refuses what the API server would, and
 * an empty selector (it would cover every user: leave `users` out to say
 * that).
 */
export function userGrantSpec(grant: UserGrant): MatrixUserGrantSpec {
  const from = distinct(grant.from ?? []);
  if (from.length < 1 || from.length > 64) {
    throw new Error(`a grant admits 1 to 64 namespaces, not ${from.length}`);
  }
  for (const namespace of from) {
    if (!DNS_LABEL.test(namespace) || namespace.length > 63) {
      throw new Error(`namespace ${JSON.stringify(namespace)} is not a DNS label`);
    }
  }
  const spec: MatrixUserGrantSpec = {
    from: from.map((namespace) => ({ namespace })) as MatrixUserGrantSpec["from"],
  };
  if (grant.maxRole !== undefined) spec.maxRole = grant.maxRole;
  const users = grant.users;
  if (users === undefined) return spec;
  const names = "names" in users ? users.names : undefined;
  const selector = "selector" in users ? users.selector : undefined;
  if ((names === undefined) === (selector === undefined)) {
    throw new Error("a grant's users are either names or a selector");
  }
  if (names !== undefined) {
    const sorted = distinct(names);
    if (sorted.length < 1 || sorted.length > 1000) {
      throw new Error(`a grant names 1 to 1000 users, not ${sorted.length}`);
    }
    spec.users = { names: sorted as [string, ...string[]] };
  } else if (selector !== undefined) {
    const labels = Object.keys(selector.matchLabels ?? {}).length;
    const expressions = selector.matchExpressions?.length ?? 0;
    if (labels + expressions === 0) {
      throw new Error("an empty selector covers every user: leave users out to say so");
    }
    spec.users = { selector };
  }
  return spec;
}
