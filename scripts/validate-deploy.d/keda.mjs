// Validates KEDA ScaledObjects against the models of the KEDA CRDs
// (@kubernetes-models/keda).
//
// Usage: CC_NODE_MODULES=DIR node keda.mjs OBJECTS.json
// DIR is the node_modules folder the models were installed into (outside the
// source tree, so it is named rather than found by Node's resolution).
// OBJECTS.json holds [{"source": "...", "doc": {...}}, ...]. Before the real
// objects, deliberately broken copies of the first one must be rejected, so a
// validator that accepts everything fails the run instead of passing it.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const models = join(process.env.CC_NODE_MODULES ?? "node_modules", "@kubernetes-models/keda");
const { ScaledObject } = await import(pathToFileURL(join(models, "keda.sh/v1alpha1/ScaledObject.js")).href);

const objects = JSON.parse(readFileSync(process.argv[2], "utf8"));
if (objects.length === 0) {
  console.error("keda: no ScaledObject to validate");
  process.exit(1);
}

function problem(doc) {
  try {
    new ScaledObject(doc).validate();
    return null;
  } catch (error) {
    return String(error.message ?? error);
  }
}

const canaries = [
  ["a replica count that is not a number", (doc) => { doc.spec.minReplicaCount = "one"; }],
  ["no scaleTargetRef", (doc) => { delete doc.spec.scaleTargetRef; }],
  ["a scaling formula that is not a string", (doc) => {
    doc.spec.advanced = { ...doc.spec.advanced, scalingModifiers: { formula: 5, target: "5" } };
  }],
];
for (const [what, breakIt] of canaries) {
  const broken = structuredClone(objects[0].doc);
  breakIt(broken);
  if (problem(broken) === null) {
    console.error(`keda: the validator accepted a ScaledObject with ${what}; is @kubernetes-models/keda intact?`);
    process.exit(1);
  }
}

let failed = 0;
for (const { source, doc } of objects) {
  const message = problem(doc);
  const name = `${source}: ScaledObject/${doc.metadata?.name}`;
  if (message === null) {
    console.log(`keda: ${name} is valid`);
  } else {
    failed += 1;
    console.log(`keda: ${name}: ${message}`);
  }
}
process.exit(failed === 0 ? 0 : 1);
