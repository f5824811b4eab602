'use strict';
// Shared bits of the node client drivers: arguments and JSON-line output.

function parseArgs(argv) {
  const out = { api: null, token: null, maxSeconds: 300 };
  for (let i = 0; i < argv.length; i += 2) {
    const [k, v] = [argv[i], argv[i + 1]];
    if (k === '--api') out.api = v.replace(/\/+$/, '');
    else if (k === '--token') out.token = v;
    else if (k === '--max-seconds') out.maxSeconds = Number(v);
    else throw new Error(`unknown argument ${k}`);
  }
  if (!out.api || !out.token) throw new Error('--api and --token are required');
  return out;
}

function emit(obj) {
  process.stdout.write(JSON.stringify({ ...obj, t: Date.now() / 1000 }) + '\n');
}

// The SDKs' package.json is not among their exports: read it from node_modules.
function packageVersion(name) {
  const fs = require('fs');
  const path = require('path');
  return JSON.parse(fs.readFileSync(path.join(__dirname, 'node_modules', name, 'package.json'), 'utf8')).version;
}

module.exports = { parseArgs, emit, packageVersion };
