// The client's types against the API's OpenAPI document (docs/openapi.json): the interfaces
// of src/types.ts, read with the TypeScript compiler, have exactly the properties of the
// schemas they stand for; a property the client requires is one the API requires; every
// field of a submission can be set from a client option; every endpoint and query parameter
// the client uses is in the document with that method. When the API gains or renames a field,
// this fails until the client's types follow.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import ts from "typescript";

import { FIELD_NAMES } from "../dist/request.js";

const HERE = fileURLToPath(new URL(".", import.meta.url));
const OPENAPI = process.env.SPINE_OPENAPI ?? resolve(HERE, "../../../docs/openapi.json");

/** @returns {any} */
function openapi() {
  try {
    return JSON.parse(readFileSync(OPENAPI, "utf8"));
  } catch (e) {
    throw new Error(
      `cannot read the API's OpenAPI document at ${OPENAPI} (set SPINE_OPENAPI to another): ${e}`,
    );
  }
}

const source = ts.createSourceFile(
  "types.ts",
  readFileSync(resolve(HERE, "../src/types.ts"), "utf8"),
  ts.ScriptTarget.ES2022,
  true,
);

/**
 * The named properties of an interface or of an object type alias, and which of them are
 * required; of a union, the properties of any member, required when every member requires
 * them. Index signatures are left out.
 * @param {string} name
 * @returns {{names: Set<string>, required: Set<string>}}
 */
function typeMembers(name) {
  /** @param {ts.NodeArray<ts.TypeElement>} members */
  const of = (members) => {
    const names = new Set();
    const required = new Set();
    for (const m of members) {
      if (!ts.isPropertySignature(m) || !m.name) continue;
      const n = m.name.getText(source).replace(/^"|"$/g, "");
      names.add(n);
      if (!m.questionToken) required.add(n);
    }
    return { names, required };
  };
  /** @param {ts.TypeNode} t @returns {{names: Set<string>, required: Set<string>}} */
  const walk = (t) => {
    if (ts.isTypeLiteralNode(t)) return of(t.members);
    if (ts.isUnionTypeNode(t)) {
      const parts = t.types.map(walk);
      return {
        names: new Set(parts.flatMap((p) => [...p.names])),
        required: new Set(
          [...(parts[0]?.required ?? [])].filter((r) => parts.every((p) => p.required.has(r))),
        ),
      };
    }
    throw new Error(`${name}: cannot read a ${ts.SyntaxKind[t.kind]}`);
  };
  for (const st of source.statements) {
    if (ts.isInterfaceDeclaration(st) && st.name.text === name) return of(st.members);
    if (ts.isTypeAliasDeclaration(st) && st.name.text === name) return walk(st.type);
  }
  throw new Error(`src/types.ts has no type ${name}`);
}

/** The string literals of a union type alias. @param {string} name */
function literals(name) {
  for (const st of source.statements) {
    if (ts.isTypeAliasDeclaration(st) && st.name.text === name && ts.isUnionTypeNode(st.type)) {
      return new Set(
        st.type.types.flatMap((t) =>
          ts.isLiteralTypeNode(t) && ts.isStringLiteral(t.literal) ? [t.literal.text] : [],
        ),
      );
    }
  }
  throw new Error(`src/types.ts has no string union ${name}`);
}

/** @param {Iterable<string>} s */
const sorted = (s) => [...s].sort();

// The client's type for each schema of the document.
const SAME = [
  ["JobView", "Job"],
  ["JobResultView", "JobResult"],
  ["JobErrorView", "JobFailure"],
  ["MapReduceProgress", "MapReduceProgress"],
  ["ApiErrorBody", "ErrorBody"],
  ["Agent", "Agent"],
  ["Capability", "Capability"],
  ["BlobRef", "BlobStored"],
  ["Fragment", "Fragment"],
  ["JobInput", "InputView"],
  ["JobStep", "JobStep"],
];

for (const [mine, theirs] of SAME) {
  test(`${mine} has the properties of the schema ${theirs}`, () => {
    const schema = openapi().components.schemas[theirs];
    assert.ok(schema, `docs/openapi.json has no schema ${theirs}`);
    const props = new Set(Object.keys(schema.properties ?? {}));
    const { names, required } = typeMembers(mine);
    assert.deepEqual(sorted(names), sorted(props), `${mine} against ${theirs}`);
    const apiRequired = new Set(schema.required ?? []);
    for (const r of required) {
      assert.ok(
        apiRequired.has(r),
        `${mine}.${r} is required by the client but optional in ${theirs}`,
      );
    }
  });
}

test("JobState has the states of the schema JobState", () => {
  assert.deepEqual(
    sorted(literals("JobState")),
    sorted(openapi().components.schemas.JobState.enum),
  );
});

test("every field of SubmitRequest can be set, and the client sends no other", () => {
  const schema = openapi().components.schemas.SubmitRequest;
  // `capability` and `args` are arguments of submit; `input` and `input_type` come from
  // `input` and `inputType`; the rest are options, named in FIELD_NAMES.
  const sent = new Set([
    "capability",
    "args",
    "input",
    "input_type",
    ...Object.values(FIELD_NAMES),
  ]);
  assert.deepEqual(sorted(sent), sorted(Object.keys(schema.properties)));
  // And each option is a property of JobFields.
  const { names } = typeMembers("JobFields");
  for (const option of Object.keys(FIELD_NAMES))
    assert.ok(names.has(option), `JobFields has no ${option}`);
});

test("every endpoint and query parameter the client uses is in the document", () => {
  const doc = openapi();
  /** @type {[string, string, string[]][]} */
  const used = [
    ["post", "/v1/jobs", ["wait"]],
    ["get", "/v1/jobs/{id}", ["wait"]],
    ["delete", "/v1/jobs/{id}", []],
    ["get", "/v1/jobs/{id}/output", []],
    ["get", "/v1/jobs/{id}/events", []],
    ["post", "/v1/jobs:batch", []],
    ["put", "/v1/blobs", []],
    ["get", "/v1/agents", ["capability", "filter", "sort", "limit"]],
    ["get", "/v1/capabilities", []],
  ];
  for (const [method, path, params] of used) {
    const op = doc.paths[path]?.[method];
    assert.ok(op, `docs/openapi.json has no ${method.toUpperCase()} ${path}`);
    const declared = new Set(
      [...(doc.paths[path].parameters ?? []), ...(op.parameters ?? [])]
        .filter((/** @type {any} */ p) => p.in === "query")
        .map((/** @type {any} */ p) => p.name),
    );
    for (const p of params)
      assert.ok(declared.has(p), `${method.toUpperCase()} ${path} has no query parameter ${p}`);
  }
});
