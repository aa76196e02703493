// What the platform does when a room of one tenant takes in a member of
// another (a speaker invited to a group's event, a partner organisation's
// people in a joint event): a MatrixUserGrant in the guest's tenant admits
// the host tenant, then the host's room names the guest. Run against the
// cluster of $KUBECONFIG:
//
//   node dist/examples/invite-guest.js --namespace openmeet-acme --tenant acme \
//     --room event-rust-meetup-2026 --guest-namespace openmeet-partner \
//     --guest user-dana --role Moderator --max-role Moderator --wait 60
//
// --guest is the guest's MatrixUser object name (repeat it for several; they
// all go into one grant, grant-<tenant>-<room>, so applying it again with
// fewer guests withdraws the others). --withdraw deletes the grant and the
// guests' permissions instead: the guests leave the room within seconds.
// --wait <seconds> waits until the grant, then the permissions, are Ready
// (or refused).
// Prints what was written, one JSON line per object (and with --wait, a last
// line {"ready": <objects>}); with --withdraw, {"removed": <name>} for each
// object deleted.
import { parseArgs } from "node:util";
import { KubeConfig } from "@kubernetes/client-node";
import {
  MatrixPlatformClient,
  permissionObjectName,
  userGrantObjectName,
  userGrantSpec,
  type MatrixResource,
  type ObjectKey,
  type Role,
} from "../src/index.js";

const { values } = parseArgs({
  options: {
    namespace: { type: "string" },
    tenant: { type: "string" },
    room: { type: "string" },
    "guest-namespace": { type: "string" },
    guest: { type: "string", multiple: true, default: [] },
    role: { type: "string", default: "Member" },
    "max-role": { type: "string" },
    label: { type: "string", multiple: true, default: [] },
    "field-manager": { type: "string" },
    withdraw: { type: "boolean", default: false },
    wait: { type: "string" },
  },
});

function need(name: "namespace" | "tenant" | "room" | "guest-namespace"): string {
  const value = values[name];
  if (!value) throw new Error(`--${name} is required`);
  return value;
}

function role(value: string | undefined): Role | undefined {
  if (value === undefined) return undefined;
  if (value !== "Member" && value !== "Moderator" && value !== "Admin") {
    throw new Error(`role ${value}: Member, Moderator or Admin`);
  }
  return value;
}

const written: ObjectKey[] = [];

function report(object: MatrixResource): void {
  const { kind, metadata } = object;
  written.push({ kind, namespace: metadata.namespace as string, name: metadata.name as string });
  console.log(
    JSON.stringify({
      kind,
      namespace: metadata.namespace,
      name: metadata.name,
      resourceVersion: metadata.resourceVersion,
      generation: metadata.generation,
    }),
  );
}

const host = need("namespace");
const tenant = need("tenant");
const room = need("room");
const guestNamespace = need("guest-namespace");
if (values.guest.length === 0) throw new Error("--guest is required");
const labels = Object.fromEntries(
  values.label.map((l) => {
    const at = l.indexOf("=");
    if (at < 1) throw new Error(`--label ${l}: key=value expected`);
    return [l.slice(0, at), l.slice(at + 1)];
  }),
);

const kc = new KubeConfig();
kc.loadFromDefault();
const client = MatrixPlatformClient.fromKubeConfig(kc, { fieldManager: values["field-manager"], labels });
// The grant lives in the guest's tenant: its name says which tenant's room it is for.
const grant = userGrantObjectName(`${tenant}-${room}`);

if (values.withdraw) {
  // The grant first: its users leave the room even if a permission lingers.
  if (await client.delete("MatrixUserGrant", guestNamespace, grant)) {
    console.log(JSON.stringify({ removed: grant }));
  }
  for (const guest of values.guest) {
    const permission = permissionObjectName(room, guest, guestNamespace);
    if (await client.delete("RoomPermission", host, permission)) {
      console.log(JSON.stringify({ removed: permission }));
    }
  }
} else {
  const timeoutMs = Number(values.wait) * 1000;
  const spec = userGrantSpec({ from: [host], users: { names: values.guest }, maxRole: role(values["max-role"]) });
  report(await client.applyUserGrant(guestNamespace, grant, spec));
  // A grant is Ready once the controller has it: a permission applied before
  // that would read ReferenceNotPermitted for a moment, which waitForReady
  // takes for a refusal.
  if (values.wait) await client.waitForReady([...written], { timeoutMs });
  for (const guest of values.guest) {
    report(await client.applyPermission(host, room, { user: guest, namespace: guestNamespace, role: role(values.role) }));
  }
  if (values.wait) {
    await client.waitForReady(written, { timeoutMs });
    console.log(JSON.stringify({ ready: written.length }));
  }
}
