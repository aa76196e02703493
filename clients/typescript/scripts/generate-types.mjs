#!/usr/bin/env node
// Generates TypeScript types for the operator's custom resources from the
// CRD schemas (crds/crds.yaml, itself generated from the Rust types).
//
//   node scripts/generate-types.mjs <crds.yaml> <out.ts | ->
//
// Deterministic and offline: the same CRDs and the same locked packages give
// byte-identical output (`make ts-types-check` relies on it). Every kind in
// the file is generated, so new kinds and fields need no change here: rerun
// `make ts-types` after `make crds`.
import { readFileSync, writeFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { compile } from "json-schema-to-typescript";

const [input, output] = process.argv.slice(2);
if (!input || !output) {
  console.error("usage: generate-types.mjs <crds.yaml> <out.ts | ->");
  process.exit(2);
}

const crds = parseAllDocuments(readFileSync(input, "utf8"))
  .map((doc) => doc.toJS())
  .filter((doc) => doc && doc.kind === "CustomResourceDefinition")
  .sort((a, b) => a.spec.names.kind.localeCompare(b.spec.names.kind));
if (crds.length === 0) {
  console.error(`${input}: no CustomResourceDefinition`);
  process.exit(1);
}

const definitions = {};
const kinds = [];

for (const crd of crds) {
  const { group, names, scope } = crd.spec;
  const storage = crd.spec.versions.filter((v) => v.storage);
  if (storage.length !== 1) throw new Error(`${crd.metadata.name}: one storage version expected`);
  const version = storage[0];
  const kind = names.kind;
  const apiVersion = `${group}/${version.name}`;
  const schema = structuredClone(version.schema.openAPIV3Schema);
  const root = convert(schema, kind, []);
  root.title = kind;
  root.properties = {
    apiVersion: { tsType: JSON.stringify(apiVersion), description: `Always \`${apiVersion}\`.` },
    kind: { tsType: JSON.stringify(kind), description: `Always \`${kind}\`.` },
    metadata: { tsType: "V1ObjectMeta", description: "Standard object metadata." },
    ...root.properties,
  };
  root.required = ["apiVersion", "kind", "metadata", ...(root.required ?? [])];
  if (root.properties.spec) root.properties.spec.title = `${kind}Spec`;
  if (root.properties.status) root.properties.status.title = `${kind}Status`;
  definitions[kind] = root;
  kinds.push({ kind, apiVersion, group, version: version.name, plural: names.plural, scope });
}

// One `Condition` type when every kind's conditions have the same schema.
function convert(schema, kind, path) {
  if (Array.isArray(schema)) return schema.map((s) => convert(s, kind, path));
  if (schema === null || typeof schema !== "object") return schema;
  const out = {};
  for (const [key, value] of Object.entries(schema)) {
    if (key === "properties") {
      out.properties = Object.fromEntries(
        Object.entries(value).map(([name, sub]) => [name, convert(sub, kind, [...path, name])]),
      );
    } else if (key === "items" && path.at(-1) === "conditions") {
      const item = convert(value, kind, [...path, "items"]);
      const { description: _ignored, ...shape } = item;
      if (!definitions.Condition) definitions.Condition = { ...item, title: "Condition" };
      const { description: _d, title: _t, ...known } = definitions.Condition;
      out.items =
        JSON.stringify(known) === JSON.stringify(shape)
          ? { $ref: "#/definitions/Condition" }
          : { ...item, title: `${kind}Condition` };
    } else if (key.startsWith("x-kubernetes-")) {
      // Handled below.
    } else if (["items", "additionalProperties", "anyOf", "oneOf", "allOf", "not"].includes(key)) {
      out[key] = convert(value, kind, key === "items" ? [...path, "items"] : path);
    } else if (key !== "nullable" && key !== "format") {
      out[key] = value;
    }
  }
  // The API server answers null for absent nullable fields.
  if (schema.nullable) {
    if (typeof out.type === "string") out.type = [out.type, "null"];
    if (Array.isArray(out.enum) && !out.enum.includes(null)) out.enum = [...out.enum, null];
  }
  if (schema["x-kubernetes-int-or-string"]) out.type = ["integer", "string"];
  if (schema["x-kubernetes-preserve-unknown-fields"] && !out.properties) {
    out.tsType = "{ [key: string]: unknown }";
  }
  // What the API server checks beyond types, stated where the editor shows it.
  const notes = [];
  if (out.default !== undefined) notes.push(`Default: \`${JSON.stringify(out.default)}\`.`);
  if (out.minimum !== undefined || out.maximum !== undefined) {
    notes.push(`Range: ${out.minimum ?? "-∞"} to ${out.maximum ?? "∞"}.`);
  }
  if (out.minLength !== undefined || out.maxLength !== undefined) {
    notes.push(`Length: ${out.minLength ?? 0} to ${out.maxLength ?? "any"}.`);
  }
  if (out.pattern !== undefined) notes.push(`Pattern: \`${out.pattern}\`.`);
  for (const rule of schema["x-kubernetes-validations"] ?? []) {
    notes.push(`Rule: ${rule.message ?? rule.rule}.`);
  }
  if (notes.length > 0) {
    out.description = [out.description, notes.join("\n")].filter(Boolean).join("\n\n");
  }
  delete out.default; // Types describe what may be sent; defaults are the server's.
  return out;
}

const banner = `/* eslint-disable */
// GENERATED by scripts/generate-types.mjs from crds/crds.yaml: do not edit.
// Regenerate with \`make ts-types\`; \`make ts-types-check\` (part of \`make lint\`) fails when stale.
import type { V1ObjectMeta } from "@kubernetes/client-node";`;

const rootSchema = {
  title: "MatrixResource",
  description: "Any object of the operator's kinds.",
  anyOf: kinds.map(({ kind }) => ({ $ref: `#/definitions/${kind}` })),
  definitions,
};

let ts = await compile(rootSchema, "MatrixResource", {
  bannerComment: banner,
  additionalProperties: false,
  unreachableDefinitions: true,
  strictIndexSignatures: true,
  format: true,
  style: { printWidth: 100, singleQuote: false, trailingComma: "all" },
  $refOptions: { resolve: { external: false, file: false, http: false } },
});

const table = kinds
  .map(
    ({ kind, apiVersion, group, version, plural, scope }) =>
      `  ${kind}: { apiVersion: ${JSON.stringify(apiVersion)}, group: ${JSON.stringify(group)}, ` +
      `version: ${JSON.stringify(version)}, kind: ${JSON.stringify(kind)}, plural: ${JSON.stringify(plural)}, ` +
      `namespaced: ${scope === "Namespaced"} },`,
  )
  .join("\n");
ts += `
/** Group, version and plural of every kind, from the CRDs. */
export const RESOURCES = {
${table}
} as const;

/** The kinds' names. */
export type MatrixKind = keyof typeof RESOURCES;
`;

if (output === "-") process.stdout.write(ts);
else writeFileSync(output, ts);
