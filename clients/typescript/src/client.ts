// Writes the operator's objects by server-side apply, with one field manager.
//
// Server-side apply sends the whole desired object every time: fields this
// manager set before and leaves out now are removed, fields it does not send
// are left to others, and an apply that changes nothing leaves the object
// (and its resourceVersion) untouched. So the platform can apply on every
// change of an event, group or membership without reading first.
import {
  ApiException,
  KubeConfig,
  KubernetesObjectApi,
  PatchStrategy,
  type KubernetesObject,
} from "@kubernetes/client-node";
import {
  RESOURCES,
  type MatrixKind,
  type MatrixResource,
  type MatrixRoom,
  type MatrixRoomSpec,
  type MatrixUser,
  type MatrixUserGrant,
  type MatrixUserGrantSpec,
  type MatrixUserSpec,
  type RoomPermission,
  type RoomPermissionSpec,
} from "./generated/crds.js";
import { health, NotReadyError, type NotReady, type ObjectKey } from "./health.js";
import { permissionObjectName, roomObjectName, ROOM_LABEL, USER_LABEL, USER_NAMESPACE_LABEL } from "./naming.js";
import {
  directRoom,
  eventRoomSpec,
  groupChatSpec,
  groupRoomNames,
  groupSpaceSpec,
  type Described,
  type EventPlacement,
} from "./structure.js";

/** The field manager the platform's writes are recorded under by default. */
export const DEFAULT_FIELD_MANAGER = "openmeet-platform";
/** Label naming the writer, on every object the kit writes. */
export const MANAGED_BY_LABEL = "app.kubernetes.io/managed-by";

export interface PlatformClientOptions {
  /** Field manager of every apply (default `openmeet-platform`). One writer, one name. */
  fieldManager?: string;
  /**
   * Take over fields another manager set to another value (default true).
   * The platform is the source of truth for these objects: with `force`, a
   * hand edit (`kubectl edit`, another tool) of a field the platform sets is
   * overwritten by its next apply. With `force: false` such an apply fails
   * with 409 Conflict naming the other manager, and nothing is written: use
   * it when another writer legitimately shares the objects and a human
   * should decide.
   */
  force?: boolean;
  /** Labels added to every object written (e.g. an environment or a selector the operator watches). */
  labels?: Record<string, string>;
}

/** One member of a room: the `MatrixUser`'s object name and its place in the room. */
export interface RoomMember {
  user: string;
  /**
   * The user's namespace, when not the room's: a `MatrixUserGrant` there
   * must admit the room's namespace (the permission is
   * `ReferenceNotPermitted` until one does, `RoleNotPermitted` above its
   * `maxRole`).
   */
  namespace?: string;
  role?: RoomPermissionSpec["role"];
  powerLevel?: RoomPermissionSpec["powerLevel"];
  membership?: RoomPermissionSpec["membership"];
}

/** What `applyGroup` did: the space and, unless left out, the group's chat room. */
export interface GroupApplied {
  space: RoomApplied;
  chat?: RoomApplied;
}

/** What `applyRoomWithMembers` did. */
export interface RoomApplied {
  room: MatrixRoom;
  permissions: RoomPermission[];
  /** Names of this writer's permissions of the room that were deleted (members no longer declared). */
  removed: string[];
}

/** The object type of a kind, and its spec, from the generated types. */
type KindObject<K extends MatrixKind> = Extract<MatrixResource, { kind: K }>;
type KindSpec<K extends MatrixKind> = KindObject<K>["spec"];

/** The object to apply: only what the platform declares (no status, no server fields). */
export function desiredObject<K extends MatrixKind>(
  kind: K,
  namespace: string,
  name: string,
  spec: KindSpec<K>,
  labels: Record<string, string> = {},
): KindObject<K> {
  return {
    apiVersion: RESOURCES[kind].apiVersion,
    kind,
    metadata: { name, namespace, labels: { ...labels } },
    spec: dropUndefined(spec),
  } as unknown as KindObject<K>;
}

/** `undefined` is "not declared": it must not reach the request as a field. */
function dropUndefined<T>(value: T): T {
  if (Array.isArray(value)) return value.map(dropUndefined) as T;
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(
    Object.entries(value)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => [k, dropUndefined(v)]),
  ) as T;
}

export function isNotFound(error: unknown): boolean {
  return error instanceof ApiException && error.code === 404;
}

export class MatrixPlatformClient {
  readonly fieldManager: string;
  readonly force: boolean;
  private readonly labels: Record<string, string>;

  constructor(
    private readonly api: KubernetesObjectApi,
    options: PlatformClientOptions = {},
  ) {
    this.fieldManager = options.fieldManager ?? DEFAULT_FIELD_MANAGER;
    this.force = options.force ?? true;
    if (!/^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$/.test(this.fieldManager)) {
      throw new Error(`fieldManager ${JSON.stringify(this.fieldManager)}: lower case, a label value`);
    }
    this.labels = { ...options.labels, [MANAGED_BY_LABEL]: this.fieldManager };
  }

  /** A client from a kubeconfig (in a pod: `kc.loadFromCluster()`; elsewhere `kc.loadFromDefault()`). */
  static fromKubeConfig(kc: KubeConfig, options?: PlatformClientOptions): MatrixPlatformClient {
    return new MatrixPlatformClient(KubernetesObjectApi.makeApiClient(kc), options);
  }

  /** Server-side-applies one object with this client's field manager and labels. */
  async apply<K extends MatrixKind>(
    kind: K,
    namespace: string,
    name: string,
    spec: KindSpec<K>,
    labels: Record<string, string> = {},
  ): Promise<KindObject<K>> {
    const object = desiredObject(kind, namespace, name, spec, { ...labels, ...this.labels });
    return (await this.api.patch(
      object as KubernetesObject,
      undefined,
      undefined,
      this.fieldManager,
      this.force,
      PatchStrategy.ServerSideApply,
    )) as KindObject<K>;
  }

  /**
   * A user, with `labels` of its own besides the client's: e.g. the label a
   * `MatrixUserGrant`'s selector matches. Like every field this writer sets,
   * a label left out of a later apply is removed (and a grant selecting it
   * stops covering the user).
   */
  applyUser(
    namespace: string,
    name: string,
    spec: MatrixUserSpec,
    labels: Record<string, string> = {},
  ): Promise<MatrixUser> {
    return this.apply("MatrixUser", namespace, name, spec, labels);
  }

  applyRoom(namespace: string, name: string, spec: MatrixRoomSpec): Promise<MatrixRoom> {
    return this.apply("MatrixRoom", namespace, name, spec);
  }

  /**
   * A `MatrixUserGrant` in `namespace`, the namespace of the users it opens
   * to the namespaces in `spec.from` (`userGrantSpec` builds the spec).
   * Withdrawing it (deleting it, or applying it narrower) takes the users
   * it no longer covers out of those namespaces' rooms. Refuses a grant
   * listing its own namespace: references within a namespace need none, so
   * that grant is on the wrong side.
   */
  async applyUserGrant(namespace: string, name: string, spec: MatrixUserGrantSpec): Promise<MatrixUserGrant> {
    if (spec.from.some((f) => f.namespace === namespace)) {
      throw new Error(
        `a grant in ${namespace} admitting ${namespace}: a grant lives in the users' namespace and lists the others`,
      );
    }
    return this.apply("MatrixUserGrant", namespace, name, spec);
  }

  /**
   * The permission `<room>.<user>` (`<room>.<user namespace>.<user>` for a
   * user of another namespace), labelled with its room and user (and the
   * user's namespace when it is another).
   */
  applyPermission(namespace: string, room: string, member: RoomMember): Promise<RoomPermission> {
    const userNamespace = member.namespace === namespace ? undefined : member.namespace;
    const spec: RoomPermissionSpec = {
      roomRef: { name: room },
      userRef: { name: member.user, namespace: userNamespace },
      role: member.role,
      powerLevel: member.powerLevel,
      membership: member.membership,
    };
    const labels: Record<string, string> = { [ROOM_LABEL]: room, [USER_LABEL]: member.user };
    if (userNamespace !== undefined) labels[USER_NAMESPACE_LABEL] = userNamespace;
    return this.apply(
      "RoomPermission",
      namespace,
      permissionObjectName(room, member.user, userNamespace),
      spec,
      labels,
    );
  }

  /**
   * A room and exactly these members: applies the room and one permission
   * per member, then deletes this writer's other permissions of the room
   * (members who left). Users are applied separately (`applyUser`): a user
   * belongs to many rooms.
   */
  async applyRoomWithMembers(
    namespace: string,
    room: string,
    spec: MatrixRoomSpec,
    members: RoomMember[],
  ): Promise<RoomApplied> {
    const applied = await this.applyRoom(namespace, room, spec);
    const permissions = [];
    for (const member of members) {
      permissions.push(await this.applyPermission(namespace, room, member));
    }
    const keep = new Set(permissions.map((p) => p.metadata.name));
    const removed = [];
    for (const name of await this.permissionNames(namespace, `${ROOM_LABEL}=${room}`)) {
      if (!keep.has(name) && (await this.delete("RoomPermission", namespace, name))) {
        removed.push(name);
      }
    }
    return { room: applied, permissions, removed };
  }

  /**
   * A group: its space (`space-<slug>`, `type: Space`) with the group's
   * members, and (unless `chat: false`) its chat room `group-<slug>` as the
   * space's first child, with the same members. Membership in the space is
   * what lets members join the group's `restricted` event rooms.
   */
  async applyGroup(
    namespace: string,
    tenant: string,
    group: Described,
    members: RoomMember[],
    options: { chat?: boolean } = {},
  ): Promise<GroupApplied> {
    const names = groupRoomNames(group.slug);
    const space = await this.applyRoomWithMembers(namespace, names.space, groupSpaceSpec(tenant, group), members);
    if (options.chat === false) return { space };
    const chat = await this.applyRoomWithMembers(namespace, names.chat, groupChatSpec(tenant, group), members);
    return { space, chat };
  }

  /**
   * An event's room `event-<slug>` with exactly these members (hosts,
   * moderators, and the attendees who should be joined rather than merely
   * allowed). With `placement`, a child of the group's space that the
   * group's members may join themselves (`restricted`).
   */
  applyEvent(
    namespace: string,
    tenant: string,
    event: Described,
    members: RoomMember[],
    placement?: EventPlacement,
  ): Promise<RoomApplied> {
    return this.applyRoomWithMembers(
      namespace,
      roomObjectName("Event", event.slug),
      eventRoomSpec(tenant, event, placement),
      members,
    );
  }

  /** The direct conversation of two users (`MatrixUser` object names): a `Direct` room, both joined. */
  applyDirect(namespace: string, tenant: string, userA: string, userB: string): Promise<RoomApplied> {
    const room = directRoom(tenant, userA, userB);
    return this.applyRoomWithMembers(namespace, room.name, room.spec, room.members);
  }

  /**
   * Deletes a group's chat room and its space (with their permissions). Its
   * event rooms wait with `ParentNotFound` until they are deleted or
   * un-parented: do that first.
   */
  async deleteGroup(namespace: string, slug: string): Promise<void> {
    const names = groupRoomNames(slug);
    await this.deleteRoom(namespace, names.chat);
    await this.deleteRoom(namespace, names.space);
  }

  /**
   * Waits until every object is `Current` (the operator converged its
   * current generation: `Ready=True`), reading each until it is. Rejects
   * with a `NotReadyError` naming the objects at fault as soon as one is
   * `Failed` (`Stalled`: it waits for a spec change, so waiting longer is
   * pointless), or when `timeoutMs` has passed.
   */
  async waitForReady(
    objects: ObjectKey[],
    options: { timeoutMs?: number; pollMs?: number } = {},
  ): Promise<void> {
    const deadline = Date.now() + (options.timeoutMs ?? 120_000);
    const pollMs = options.pollMs ?? 1_000;
    let waiting = [...objects];
    for (;;) {
      const last: NotReady[] = [];
      for (const key of waiting) {
        const object = await this.read(key);
        const verdict = object
          ? health(object)
          : { status: "InProgress" as const, reason: "NotFound", message: "not created yet" };
        if (verdict.status === "Failed") throw new NotReadyError([{ ...key, health: verdict }], false);
        if (verdict.status !== "Current") last.push({ ...key, health: verdict });
      }
      if (last.length === 0) return;
      if (Date.now() >= deadline) throw new NotReadyError(last, true);
      waiting = last.map(({ kind, namespace, name }) => ({ kind, namespace, name }));
      await new Promise((resolve) => setTimeout(resolve, pollMs));
    }
  }

  /** One object as the API server has it; undefined when there is none. */
  async read(key: ObjectKey): Promise<MatrixResource | undefined> {
    try {
      return (await this.api.read({
        apiVersion: RESOURCES[key.kind].apiVersion,
        kind: key.kind,
        metadata: { name: key.name, namespace: key.namespace },
      })) as MatrixResource;
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw error;
    }
  }

  /** Deletes one object; false when it was already gone. */
  async delete(kind: MatrixKind, namespace: string, name: string): Promise<boolean> {
    try {
      await this.api.delete({ apiVersion: RESOURCES[kind].apiVersion, kind, metadata: { name, namespace } });
      return true;
    } catch (error) {
      if (isNotFound(error)) return false;
      throw error;
    }
  }

  /**
   * Deletes a room, then this writer's permissions of it. The room goes
   * first so that its `deletionPolicy` decides what happens to the members
   * (`Retain` keeps them; deleting the permissions first would remove them
   * from an `Exclusive` room before that).
   */
  async deleteRoom(namespace: string, room: string): Promise<void> {
    await this.delete("MatrixRoom", namespace, room);
    for (const name of await this.permissionNames(namespace, `${ROOM_LABEL}=${room}`)) {
      await this.delete("RoomPermission", namespace, name);
    }
  }

  /**
   * Deletes a user (its `deletionPolicy` applies), then this writer's
   * permissions of it: those of its namespace and, in each namespace of
   * `options.referencedFrom` (where its grants let rooms name it), those
   * naming it from there.
   */
  async deleteUser(namespace: string, user: string, options: { referencedFrom?: string[] } = {}): Promise<void> {
    await this.delete("MatrixUser", namespace, user);
    const own = `${USER_LABEL}=${user},!${USER_NAMESPACE_LABEL}`;
    for (const name of await this.permissionNames(namespace, own)) {
      await this.delete("RoomPermission", namespace, name);
    }
    const guest = `${USER_LABEL}=${user},${USER_NAMESPACE_LABEL}=${namespace}`;
    for (const other of options.referencedFrom ?? []) {
      if (other === namespace) continue;
      for (const name of await this.permissionNames(other, guest)) {
        await this.delete("RoomPermission", other, name);
      }
    }
  }

  /** Names of this writer's permissions matching the label selector `labels`. */
  private async permissionNames(namespace: string, labels: string): Promise<string[]> {
    const { apiVersion } = RESOURCES.RoomPermission;
    const selector = `${labels},${MANAGED_BY_LABEL}=${this.fieldManager}`;
    const list = await this.api.list<RoomPermission>(
      apiVersion,
      "RoomPermission",
      namespace,
      undefined,
      undefined,
      undefined,
      undefined,
      selector,
    );
    return list.items.map((p) => p.metadata.name as string).sort();
  }
}
