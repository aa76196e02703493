// Reading an object's health the way kstatus (and so Flux and Argo CD) reads
// it: the operator writes kstatus conditions (`Ready`, `Reconciling`,
// `Stalled`, each with `observedGeneration`).
import type { MatrixResource } from "./generated/crds.js";

/** kstatus's verdicts, as far as these objects can be in them. */
export type HealthStatus = "Current" | "InProgress" | "Failed" | "Terminating";

export interface Health {
  status: HealthStatus;
  /** The `Ready` reason (`Converged`, `AliasConflict`, …), or why there is none yet. */
  reason: string;
  message: string;
}

interface Condition {
  type: string;
  status: string;
  reason?: string;
  message?: string;
  observedGeneration?: number;
}

/**
 * The object's health: `Current` once the operator has converged this very
 * generation (`Ready=True`); `Failed` when it waits for a spec change
 * (`Stalled=True`: a conflict, a refusal); `Terminating` while it is being
 * deleted; `InProgress` otherwise (not looked at yet, still converging).
 */
export function health(object: MatrixResource): Health {
  if (object.metadata?.deletionTimestamp) {
    return { status: "Terminating", reason: "Deleting", message: "the object is being deleted" };
  }
  const status = (object as { status?: { conditions?: Condition[]; observedGeneration?: number } }).status;
  const generation = object.metadata?.generation;
  const observed = status?.observedGeneration;
  if (generation !== undefined && (observed === undefined || observed < generation)) {
    return {
      status: "InProgress",
      reason: "NotObserved",
      message: `generation ${generation} not looked at yet (observed ${observed ?? "none"})`,
    };
  }
  const conditions = status?.conditions ?? [];
  const find = (type: string) =>
    conditions.find(
      (c) => c.type === type && (c.observedGeneration === undefined || c.observedGeneration === generation),
    );
  const ready = find("Ready");
  const said = (c: Condition | undefined, fallback: string) => ({
    reason: c?.reason ?? fallback,
    message: c?.message ?? "",
  });
  if (ready?.status === "True") return { status: "Current", ...said(ready, "Ready") };
  const stalled = find("Stalled");
  if (stalled?.status === "True") return { status: "Failed", ...said(ready ?? stalled, "Stalled") };
  return { status: "InProgress", ...said(ready ?? find("Reconciling"), "Reconciling") };
}

/** Which object: its kind, namespace and name. */
export interface ObjectKey {
  kind: MatrixResource["kind"];
  namespace: string;
  name: string;
}

/** An object that did not become `Current`: what it said last. */
export interface NotReady extends ObjectKey {
  health: Health;
}

/** `waitForReady` gave up: some objects failed (`Stalled`) or the time ran out. */
export class NotReadyError extends Error {
  constructor(
    readonly notReady: NotReady[],
    readonly timedOut: boolean,
  ) {
    super(
      (timedOut ? "not Ready in time: " : "refused: ") +
        notReady.map((o) => `${o.kind} ${o.namespace}/${o.name} (${o.health.status} ${o.health.reason})`).join(", "),
    );
    this.name = "NotReadyError";
  }
}
