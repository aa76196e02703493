// @openmeet/matrix-operator-client: types generated from the operator's CRDs,
// naming and role rules, spec builders and a server-side-apply client
// (docs/platform.md).
export * from "./generated/crds.js";
export * from "./naming.js";
export * from "./roles.js";
export * from "./structure.js";
export * from "./grant.js";
export * from "./client.js";
export * from "./health.js";
export * from "./sidecar.js";
