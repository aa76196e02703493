// What the platform does for a group, one of its events and a direct
// conversation: the group's space and chat room with the group's members,
// the event as a child room of the space that the members may join
// themselves (restricted), and a Direct room between two members. Run
// against the cluster of $KUBECONFIG:
//
//   node dist/examples/apply-group.js --namespace openmeet-acme --tenant acme \
//     --group rust-berlin --title "Rust Berlin" \
//     --member 7f3c2a10:alice:owner --member 9b1e44d2:bob:member --member 5d0c:carol:member \
//     --event rust-berlin-march --event-title "March meetup" --order 2026-03-14 --suggested \
//     --event-person 7f3c2a10:host --event-person 5d0c:attendee \
//     --direct 9b1e44d2:5d0c
//
// --member is <platform user id>:<handle>:<owner|admin|member>;
// --event-person <platform user id>:<host|moderator|attendee> (a member of
// the group): hosts and moderators get their power, attendees are joined;
// the group's other members may join the event room from their clients.
// --direct <user id>:<user id> (two members) applies their direct conversation.
// --wait <seconds> then waits until everything written is Ready (or refused).
// Prints what was written, one JSON line per object (and with --wait, a last
// line {"ready": <objects>}).
import { parseArgs } from "node:util";
import { KubeConfig } from "@kubernetes/client-node";
import {
  MatrixPlatformClient,
  localpartProblem,
  roleFor,
  userObjectName,
  type MatrixResource,
  type ObjectKey,
  type RoomApplied,
  type RoomMember,
} from "../src/index.js";

const { values } = parseArgs({
  options: {
    namespace: { type: "string" },
    tenant: { type: "string" },
    group: { type: "string" },
    title: { type: "string" },
    member: { type: "string", multiple: true, default: [] },
    event: { type: "string" },
    "event-title": { type: "string" },
    order: { type: "string" },
    suggested: { type: "boolean", default: false },
    "event-person": { type: "string", multiple: true, default: [] },
    direct: { type: "string", multiple: true, default: [] },
    label: { type: "string", multiple: true, default: [] },
    "field-manager": { type: "string" },
    wait: { type: "string" },
  },
});

function need(name: "namespace" | "tenant" | "group"): string {
  const value = values[name];
  if (!value) throw new Error(`--${name} is required`);
  return value;
}

const written: ObjectKey[] = [];

function report(object: MatrixResource): void {
  const { kind, metadata } = object;
  written.push({ kind, namespace: metadata.namespace as string, name: metadata.name as string });
  console.log(
    JSON.stringify({
      kind,
      name: metadata.name,
      resourceVersion: metadata.resourceVersion,
      generation: metadata.generation,
    }),
  );
}

function reportRoom(applied: RoomApplied): void {
  report(applied.room);
  applied.permissions.forEach(report);
  for (const name of applied.removed) console.log(JSON.stringify({ removed: name }));
}

const namespace = need("namespace");
const tenant = need("tenant");
const group = need("group");
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

// The group's members: their accounts, and their place in the group.
const users = new Map<string, string>();
const groupMembers: RoomMember[] = [];
for (const member of values.member) {
  const [subject, handle, groupRole] = member.split(":");
  if (!subject || !handle || !groupRole) throw new Error(`--member ${member}: subject:handle:role`);
  const problem = localpartProblem(handle);
  if (problem) throw new Error(`handle ${handle}: ${problem}`);
  const user = userObjectName(subject);
  report(await client.applyUser(namespace, user, { localpart: handle, displayName: handle, subject }));
  users.set(subject, user);
  groupMembers.push({ user, role: roleFor("Group", groupRole) });
}
function userOf(subject: string): string {
  const user = users.get(subject);
  if (!user) throw new Error(`${subject} is not a --member of the group`);
  return user;
}

const applied = await client.applyGroup(namespace, tenant, { slug: group, name: values.title ?? group }, groupMembers);
reportRoom(applied.space);
if (applied.chat) reportRoom(applied.chat);

if (values.event) {
  const people = values["event-person"].map((p) => {
    const [subject, eventRole] = p.split(":");
    if (!subject || !eventRole) throw new Error(`--event-person ${p}: subject:role`);
    return { user: userOf(subject), role: roleFor("Event", eventRole) };
  });
  reportRoom(
    await client.applyEvent(
      namespace,
      tenant,
      { slug: values.event, name: values["event-title"] ?? values.event },
      people,
      { group, order: values.order, suggested: values.suggested },
    ),
  );
}

for (const pair of values.direct) {
  const [a, b] = pair.split(":");
  if (!a || !b) throw new Error(`--direct ${pair}: subject:subject`);
  reportRoom(await client.applyDirect(namespace, tenant, userOf(a), userOf(b)));
}

if (values.wait) {
  await client.waitForReady(written, { timeoutMs: Number(values.wait) * 1000 });
  console.log(JSON.stringify({ ready: written.length }));
}
