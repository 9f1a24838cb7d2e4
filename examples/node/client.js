// An optserve client in Node.js that knows only the contract (proto/optserve/v1/optserve.proto,
// loaded at run time): it creates a model, pushes one gradient and pulls the parameters back.
//
//   node client.js [HOST:PORT] [MODEL]
//
// Tensors travel as raw little-endian bytes described by TensorSlice messages (path, dtype, shape,
// byte offset, length); the bytes of all slices of a message are concatenated in `payload`.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'optserve', 'v1', 'optserve.proto');
const target = process.argv[2] || process.env.OPTSERVE_TARGET || '127.0.0.1:8470';
const modelName = process.argv[3] || 'node-example';

const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, defaults: true });
const { Optserve } = grpc.loadPackageDefinition(definition).optserve.v1;
const client = new Optserve(target, grpc.credentials.createInsecure());

function float32Bytes(values) {
  const buf = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buf.writeFloatLE(v, i * 4));
  return buf;
}

// One message carrying a whole small float32 leaf.
function leafChunk(leafPath, values) {
  const payload = float32Bytes(values);
  return {
    slices: [{ path: leafPath, dtype: 'float32', shape: [values.length], offset: 0, length: payload.length }],
    payload,
  };
}

function createModel(params, optimizer) {
  return new Promise((resolve, reject) => {
    const call = client.CreateModel((err, info) => (err ? reject(err) : resolve(info)));
    const schema = Object.entries(params).map(([p, v]) => ({ path: p, dtype: 'float32', shape: [v.length] }));
    const entries = Object.entries(params);
    entries.forEach(([p, v], i) => {
      const msg = leafChunk(p, v);
      if (i === 0) msg.header = { name: modelName, optimizer_json: JSON.stringify(optimizer), settings: { mode: 'async' }, schema };
      call.write(msg);
    });
    call.end();
  });
}

function push(grads) {
  return new Promise((resolve, reject) => {
    const call = client.Push((err, reply) => (err ? reject(err) : resolve(reply)));
    Object.entries(grads).forEach(([p, v], i) => {
      const msg = leafChunk(p, v);
      if (i === 0) msg.header = { model: modelName };
      call.write(msg);
    });
    call.end();
  });
}

// Reassembles every leaf from its slices (by byte offset) into a Float32Array.
function pull() {
  return new Promise((resolve, reject) => {
    const leaves = {};
    let step = -1;
    const call = client.Pull({ model: modelName });
    call.on('data', (msg) => {
      if (msg.header) step = Number(msg.header.step);
      let pos = 0;
      for (const s of msg.slices) {
        const length = Number(s.length);
        if (!leaves[s.path]) {
          const count = s.shape.reduce((a, d) => a * Number(d), 1);
          leaves[s.path] = Buffer.alloc(count * 4);
        }
        msg.payload.copy(leaves[s.path], Number(s.offset), pos, pos + length);
        pos += length;
      }
    });
    call.on('error', reject);
    call.on('end', () => {
      const out = {};
      for (const [p, buf] of Object.entries(leaves)) {
        out[p] = Array.from({ length: buf.length / 4 }, (_, i) => buf.readFloatLE(i * 4));
      }
      resolve({ step, params: out });
    });
  });
}

async function main() {
  const params = { w: [1, 2, 3, 4], b: [0.5] };
  await createModel(params, { sgd: { learning_rate: 0.1 } });
  const reply = await push({ w: [1, 1, 1, 1], b: [-1] });
  const { step, params: pulled } = await pull();
  const expected = { w: [0.9, 1.9, 2.9, 3.9], b: [0.6] };
  const close = (a, b) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) < 1e-6);
  const ok = reply.step === 1 && step === 1 && close(pulled.w, expected.w) && close(pulled.b, expected.b);
  console.log(JSON.stringify({ ok, push_step: reply.step, pull_step: step, params: pulled }));
  client.close();
  process.exit(ok ? 0 : 1);
}

main().catch((err) => {
  console.error(`optserve node example failed: ${err.code !== undefined ? `status ${err.code}: ` : ''}${err.details || err.message}`);
  process.exit(1);
});
