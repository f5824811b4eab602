// Client driver: box-node-sdk 3.x, client.events.getEventStream(cb).
// Prints one JSON line per event received ({"kind":"event","event_id":...}) on
// stdout, {"kind":"error",...} for each error the stream emits (it keeps going).
// Exits by itself after --max-seconds.
'use strict';
const http = require('http');
const BoxSDK = require('box-node-sdk-v3');
const { parseArgs, emit, packageVersion } = require('./common');

const version = packageVersion('box-node-sdk-v3');

const args = parseArgs(process.argv.slice(2));
setTimeout(() => process.exit(0), args.maxSeconds * 1000);

const sdk = new BoxSDK({
  clientID: 'nudge-test-client',
  clientSecret: 'nudge-test-secret',
  apiRootURL: args.api,
  // The default agent is https.Agent, which refuses http:// realtime URLs.
  request: { agentClass: http.Agent },
});
const client = sdk.getBasicClient(args.token);
emit({ kind: 'started', sdk: 'box-node-sdk', version });
client.events.getEventStream((err, stream) => {
  if (err) {
    emit({ kind: 'fatal', error: String(err && err.message) });
    process.exit(3);
  }
  stream.on('data', (event) => emit({ kind: 'event', event_id: event.event_id }));
  stream.on('error', (e) => emit({ kind: 'error', error: String(e && e.message) }));
  stream.on('close', () => { emit({ kind: 'fatal', error: 'stream closed' }); process.exit(4); });
});
