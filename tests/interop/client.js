// kpl's JavaScript interop client: what a chat bot written in JavaScript
// does with kpld, using @grpc/grpc-js and no .proto file. It learns the
// types by server reflection (grpc-js-reflection-client), submits a
// pipeline with an approval stage, watches the run's events, approves the
// stage when it is WAITING, and checks that the run SUCCEEDED with its
// events in the expected order.
//
//   node client.js HOST:PORT
//
// Exit status 0 when every check passed, 1 otherwise (the reason on
// stderr). Everything is bounded by DEADLINE_MS.
'use strict';

const grpc = require('@grpc/grpc-js');
const { GrpcReflection } = require('grpc-js-reflection-client');

const DEADLINE_MS = 60000;
const SERVICE = 'kpl.v1.Pipelines';

const PIPELINE = `
name: interop-js
params:
  version: { required: true }
stages:
  - name: build
    kind: script
    with: { command: ["echo", "built \${{ params.version }}"] }
  - name: gate
    kind: approval
    needs: [build]
    with: { message: "ship \${{ params.version }}?" }
  - name: ship
    kind: noop
    needs: [gate]
`;

// The state events of the run, in order (log and audit events aside).
const WANT_STATES = [
  'run QUEUED',
  'run RUNNING',
  'build RUNNING',
  'build SUCCEEDED',
  'gate RUNNING',
  'gate WAITING',
  'gate SUCCEEDED',
  'ship RUNNING',
  'ship SUCCEEDED',
  'run SUCCEEDED',
];

function fail(msg) {
  process.stderr.write(`interop: FAIL: ${msg}\n`);
  process.exit(1);
}

function check(cond, msg) {
  if (!cond) fail(msg);
}

function unary(client, method, req) {
  return new Promise((resolve, reject) => {
    client[method](req, { deadline: Date.now() + 10000 }, (err, resp) =>
      err ? reject(new Error(`${method}: ${err.code} ${err.details}`)) : resolve(resp));
  });
}

function describe(ev) {
  if (ev.kind === 'EVENT_KIND_RUN_STATE')
    return `run ${ev.run_state.replace('RUN_STATE_', '')}`;
  if (ev.kind === 'EVENT_KIND_STAGE_STATE')
    return `${ev.stage} ${ev.stage_state.replace('STAGE_STATE_', '')}`;
  return null;
}

async function main() {
  const addr = process.argv[2];
  check(addr, 'usage: node client.js HOST:PORT');
  const timer = setTimeout(() => fail(`not done within ${DEADLINE_MS} ms`), DEADLINE_MS);
  const creds = grpc.credentials.createInsecure();

  // 1. Discover the service by reflection: no .proto file here.
  const reflection = new GrpcReflection(addr, creds);
  const services = await reflection.listServices();
  check(services.includes(SERVICE), `reflection lists ${JSON.stringify(services)}, not ${SERVICE}`);
  const descriptor = await reflection.getDescriptorBySymbol(SERVICE);
  const pkg = descriptor.getPackageObject({
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const Pipelines = pkg.kpl && pkg.kpl.v1 && pkg.kpl.v1.Pipelines;
  check(typeof Pipelines === 'function', 'kpl.v1.Pipelines is not in the reflected package');
  const client = new Pipelines(addr, creds);
  for (const m of ['SubmitRun', 'WatchRun', 'ApproveStage', 'GetRun'])
    check(typeof client[m] === 'function', `no method ${m} learnt by reflection`);

  // 2. Submit. A proto3 map learnt from a reflected descriptor may come
  // back as its repeated entry messages (these versions lose map_entry on
  // the way to @grpc/proto-loader): the wire form is the same, so give
  // params the shape the client's serializer takes.
  let params = { version: '1.2.3' };
  try {
    client.SubmitRun.requestSerialize({ pipeline: '', params, idempotency_key: '' });
  } catch (e) {
    params = [{ key: 'version', value: '1.2.3' }];
  }
  const run = await unary(client, 'SubmitRun', {
    pipeline: PIPELINE, params, idempotency_key: '',
  });
  check(run.id && run.id.length > 0, 'SubmitRun returned no run id');
  process.stdout.write(`interop: submitted run ${run.id}\n`);

  // 3. Watch; approve the gate when it waits.
  const events = [];
  let approved = false;
  await new Promise((resolve, reject) => {
    const call = client.WatchRun({ id: run.id, from_seq: 0 });
    call.on('data', (ev) => {
      events.push(ev);
      if (ev.kind === 'EVENT_KIND_STAGE_STATE' && ev.stage === 'gate' &&
          ev.stage_state === 'STAGE_STATE_WAITING' && !approved) {
        approved = true;
        check(ev.message === 'waiting for approval: ship 1.2.3?', `the gate waits with message ${JSON.stringify(ev.message)}`);
        unary(client, 'ApproveStage', {
          run_id: run.id, stage: 'gate', approve: true, comment: 'looks good', by: 'js-bot',
        }).then(() => process.stdout.write('interop: approved gate\n'), reject);
      }
    });
    call.on('error', (err) => reject(new Error(`WatchRun: ${err.code} ${err.details}`)));
    // The stream ends with OK after the run's final event.
    call.on('end', resolve);
  });

  // 4. Check what was seen.
  check(approved, 'the gate never waited for approval');
  const seqs = events.map((ev) => Number(ev.seq));
  seqs.forEach((s, i) => check(s === i + 1, `event ${i} has seq ${s}, want ${i + 1} (no gaps)`));
  const globals = events.map((ev) => BigInt(ev.global_seq));
  for (let i = 1; i < globals.length; i++)
    check(globals[i] > globals[i - 1], 'global seqs do not increase');
  const states = events.map(describe).filter((d) => d !== null);
  check(JSON.stringify(states) === JSON.stringify(WANT_STATES),
    `state events ${JSON.stringify(states)}, want ${JSON.stringify(WANT_STATES)}`);
  const at = (d) => events.findIndex((ev) => describe(ev) === d);
  const log = events.findIndex((ev) => ev.kind === 'EVENT_KIND_LOG' && ev.stage === 'build' &&
    ev.message === 'built 1.2.3');
  check(log > at('build RUNNING') && log < at('build SUCCEEDED'),
    'the build\'s log line "built 1.2.3" is not between its RUNNING and SUCCEEDED');
  const gateDone = events[at('gate SUCCEEDED')];
  check(gateDone.message === 'approved by js-bot: looks good',
    `the gate ended with message ${JSON.stringify(gateDone.message)}`);
  const last = events[events.length - 1];
  check(last.kind === 'EVENT_KIND_RUN_STATE' && last.run_state === 'RUN_STATE_SUCCEEDED',
    'the stream did not end with the run SUCCEEDED');

  const got = await unary(client, 'GetRun', { id: run.id });
  check(got.state === 'RUN_STATE_SUCCEEDED', `GetRun says ${got.state}`);
  check(got.stages.map((s) => `${s.name} ${s.state}`).join(',') ===
    'build STAGE_STATE_SUCCEEDED,gate STAGE_STATE_SUCCEEDED,ship STAGE_STATE_SUCCEEDED',
    `GetRun stages ${JSON.stringify(got.stages.map((s) => [s.name, s.state]))}`);

  clearTimeout(timer);
  client.close();
  process.stdout.write(`interop: ok: ${events.length} events, run ${run.id} SUCCEEDED\n`);
  process.exit(0);
}

main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
