// Validate a glTF file with the Khronos glTF Validator (npm gltf-validator) and print its report
// as JSON on stdout. Usage: node tests/web/validate.js FILE.glb
'use strict';
const fs = require('fs');
const path = require('path');
const validator = require('gltf-validator');

const file = process.argv[2];
if (!file) {
  console.error('usage: node validate.js FILE.glb');
  process.exit(2);
}
const data = new Uint8Array(fs.readFileSync(file));
validator.validateBytes(data, {
  uri: path.basename(file),
  maxIssues: 0, // report every issue
  // A .glb holds all its data: an external resource would be an error of the export.
  externalResourceFunction: (uri) => Promise.reject(new Error(`external resource ${uri}`)),
}).then((report) => {
  process.stdout.write(JSON.stringify(report));
}).catch((error) => {
  console.error(`validator failed: ${error}`);
  process.exit(1);
});
