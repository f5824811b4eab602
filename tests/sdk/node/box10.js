// Client driver: box-node-sdk 10.x, client.events.getEventStream().
// Prints one JSON line per event received ({"kind":"event","event_id":...}) on
// stdout, {"kind":"error",...} for each error the stream emits (it keeps going).
// Exits by itself after --max-seconds.
'use strict';
const { BoxClient, BoxDeveloperTokenAuth } = require('box-node-sdk-v10');
const { parseArgs, emit, packageVersion } = require('./common');

const version = packageVersion('box-node-sdk-v10');

const args = parseArgs(process.argv.slice(2));
setTimeout(() => process.exit(0), args.maxSeconds * 1000);

const client = new BoxClient({
  auth: new BoxDeveloperTokenAuth({ token: args.token }),
}).withCustomBaseUrls({ baseUrl: args.api });
emit({ kind: 'started', sdk: 'box-node-sdk', version });
const stream = client.events.getEventStream();
stream.on('data', (event) => emit({ kind: 'event', event_id: event.eventId }));
stream.on('error', (e) => emit({ kind: 'error', error: String(e && e.message) }));
stream.on('close', () => { emit({ kind: 'fatal', error: 'stream closed' }); process.exit(4); });
