// What the platform does when an event or its people change: apply the
// people's accounts, the event's room and one permission per person, by
// server-side apply. Run against the cluster of $KUBECONFIG:
//
//   node dist/examples/apply-event.js --namespace openmeet-acme --tenant acme \
//     --event rust-meetup-2026 --title "Rust Meetup 2026" \
//     --person 7f3c2a10:alice:host --person 9b1e44d2:bob:attendee
//
// --person is <platform user id>:<handle>:<host|moderator|attendee>.
// --delete deletes the event's room (and its permissions) instead.
// Prints what was written, one JSON line per object.
import { parseArgs } from "node:util";
import { KubeConfig } from "@kubernetes/client-node";
import {
  MatrixPlatformClient,
  localpartProblem,
  roleFor,
  roomAlias,
  roomObjectName,
  userObjectName,
  type MatrixResource,
} from "../src/index.js";

const { values } = parseArgs({
  options: {
    namespace: { type: "string" },
    tenant: { type: "string" },
    event: { type: "string" },
    title: { type: "string" },
    person: { type: "string", multiple: true, default: [] },
    label: { type: "string", multiple: true, default: [] },
    "field-manager": { type: "string" },
    "no-force": { type: "boolean", default: false },
    delete: { type: "boolean", default: false },
  },
});

function need(name: "namespace" | "tenant" | "event"): string {
  const value = values[name];
  if (!value) throw new Error(`--${name} is required`);
  return value;
}

function report(object: MatrixResource): void {
  const { kind, metadata } = object;
  console.log(
    JSON.stringify({
      kind,
      name: metadata.name,
      resourceVersion: metadata.resourceVersion,
      generation: metadata.generation,
    }),
  );
}

const namespace = need("namespace");
const tenant = need("tenant");
const slug = need("event");
const labels = Object.fromEntries(
  values.label.map((l) => {
    const at = l.indexOf("=");
    if (at < 1) throw new Error(`--label ${l}: key=value expected`);
    return [l.slice(0, at), l.slice(at + 1)];
  }),
);

const kc = new KubeConfig();
kc.loadFromDefault();
const client = MatrixPlatformClient.fromKubeConfig(kc, {
  fieldManager: values["field-manager"],
  force: !values["no-force"],
  labels,
});
const room = roomObjectName("Event", slug);

if (values.delete) {
  await client.deleteRoom(namespace, room);
  console.log(JSON.stringify({ deleted: room }));
} else {
  const members = [];
  for (const person of values.person) {
    const [subject, handle, eventRole] = person.split(":");
    if (!subject || !handle || !eventRole) throw new Error(`--person ${person}: subject:handle:role`);
    const problem = localpartProblem(handle);
    if (problem) throw new Error(`handle ${handle}: ${problem}`);
    const user = userObjectName(subject);
    report(await client.applyUser(namespace, user, { localpart: handle, displayName: handle, subject }));
    members.push({ user, role: roleFor("Event", eventRole) });
  }
  const applied = await client.applyRoomWithMembers(
    namespace,
    room,
    {
      alias: roomAlias(tenant, "Event", slug),
      name: values.title ?? slug,
      source: { kind: "Event", slug },
    },
    members,
  );
  report(applied.room);
  applied.permissions.forEach(report);
  for (const name of applied.removed) console.log(JSON.stringify({ removed: name }));
}
