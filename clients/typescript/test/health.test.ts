// Unit tests of reading an object's health as kstatus does.
import { test } from "node:test";
import assert from "node:assert/strict";
import { health, type MatrixRoom, type MatrixUserGrant } from "../src/index.js";

function room(generation: number, status?: object, deleting = false): MatrixRoom {
  return {
    apiVersion: "matrix.openmeet.net/v1alpha1",
    kind: "MatrixRoom",
    metadata: {
      name: "r",
      namespace: "t",
      generation,
      ...(deleting ? { deletionTimestamp: new Date() } : {}),
    },
    spec: { alias: "r" },
    ...(status ? { status } : {}),
  } as MatrixRoom;
}

const ready = (generation: number, ok: boolean, reason: string) => ({
  type: "Ready",
  status: ok ? "True" : "False",
  reason,
  message: `${reason} message`,
  observedGeneration: generation,
});

test("converged for its current generation is Current", () => {
  const r = room(2, { observedGeneration: 2, conditions: [ready(2, true, "Converged")] });
  assert.deepEqual(health(r), { status: "Current", reason: "Converged", message: "Converged message" });
});

test("a generation not looked at yet is InProgress, whatever the old verdict", () => {
  assert.equal(health(room(1)).status, "InProgress");
  const r = room(3, { observedGeneration: 2, conditions: [ready(2, true, "Converged")] });
  assert.deepEqual(health(r).status, "InProgress");
  assert.equal(health(r).reason, "NotObserved");
});

test("Stalled is Failed, with the Ready reason", () => {
  const r = room(1, {
    observedGeneration: 1,
    conditions: [
      ready(1, false, "AliasConflict"),
      { type: "Stalled", status: "True", reason: "AliasConflict", observedGeneration: 1 },
    ],
  });
  assert.deepEqual(health(r), { status: "Failed", reason: "AliasConflict", message: "AliasConflict message" });
});

test("Reconciling is InProgress, and deletion Terminating", () => {
  const r = room(1, {
    observedGeneration: 1,
    conditions: [
      ready(1, false, "SynapseUnavailable"),
      { type: "Reconciling", status: "True", reason: "SynapseUnavailable", observedGeneration: 1 },
    ],
  });
  assert.equal(health(r).status, "InProgress");
  assert.equal(health(r).reason, "SynapseUnavailable");
  assert.equal(health(room(1, undefined, true)).status, "Terminating");
});

test("a grant in effect is Current; a refused reference is Failed with its reason", () => {
  const grant: MatrixUserGrant = {
    apiVersion: "matrix.openmeet.net/v1alpha1",
    kind: "MatrixUserGrant",
    metadata: { name: "grant-acme", namespace: "openmeet-partner", generation: 1 },
    spec: { from: [{ namespace: "openmeet-acme" }] },
    status: {
      observedGeneration: 1,
      permissions: 2,
      usedBy: [{ namespace: "openmeet-acme", permissions: 2 }],
      conditions: [ready(1, true, "Granted")],
    },
  };
  assert.deepEqual(health(grant), { status: "Current", reason: "Granted", message: "Granted message" });
  const refused = room(1, {
    observedGeneration: 1,
    conditions: [
      ready(1, false, "ReferenceNotPermitted"),
      { type: "Stalled", status: "True", reason: "ReferenceNotPermitted", observedGeneration: 1 },
    ],
  });
  assert.equal(health(refused).status, "Failed");
  assert.equal(health(refused).reason, "ReferenceNotPermitted");
});
