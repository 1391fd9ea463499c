// The Milvus quickstart through the Node SDK's gRPC MilvusClient (@zilliz/milvus2-sdk-node,
// pinned in package.json, installed by `make deps`) against a running Shoal, every result
// checked against a brute-force oracle computed here.
//
// Usage: node node_quickstart.js ADDRESS [TOKEN]   (ADDRESS like 127.0.0.1:19530)
// Run by node-engine/tests/milvus_grpc.rs; exits non-zero (with the reason) on any mismatch.
'use strict';

const { MilvusClient } = require('@zilliz/milvus2-sdk-node');

const [address, token] = process.argv.slice(2);
const NAME = 'node_demo';
const DIM = 8;
const N = 100;

function check(cond, what) {
  if (!cond) throw new Error(what);
}

function ok(res, what) {
  const s = res.status || res;
  check(
    (s.error_code === 'Success' || s.error_code === 0 || s.error_code === undefined) &&
      (s.code === 0 || s.code === undefined),
    `${what}: ${JSON.stringify(s)}`,
  );
  return res;
}

// A fixed pseudo-random sequence (xorshift), so runs are reproducible.
let seed = 7;
function rand() {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return ((seed >>> 0) / 4294967296) * 2 - 1;
}

// The Node SDK names query columns after the result's field data, so dynamic fields of query
// and get rows come nested under `$meta` (see the README's Milvus compatibility table).
function dyn(row, key) {
  return row[key] !== undefined ? row[key] : (row.$meta || {})[key];
}

function cosine(a, b) {
  let d = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    d += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return d / Math.sqrt(na * nb);
}

function oracle(rows, q, k, pred = () => true) {
  return rows
    .filter(pred)
    .map((r) => [cosine(r.vector, q), r.id])
    .sort((x, y) => y[0] - x[0] || x[1] - y[1])
    .slice(0, k);
}

function checkHits(hits, want, what) {
  check(hits.length === want.length, `${what}: ${hits.length} hits, expected ${want.length}`);
  hits.forEach((h, i) => {
    const [score, id] = want[i];
    check(Math.abs(h.score - score) < 1e-4, `${what}: score ${h.score} vs oracle ${score}`);
    check(Number(h.id) === id || Math.abs(h.score - score) < 1e-5, `${what}: id ${h.id} vs ${id}`);
  });
}

async function main() {
  const client = new MilvusClient({ address, token: token || undefined });
  const version = await client.getVersion();
  ok(version, 'getVersion');
  check(version.version.startsWith('v2.'), `version ${version.version}`);

  const has = await client.hasCollection({ collection_name: NAME });
  if (has.value) ok(await client.dropCollection({ collection_name: NAME }), 'drop');
  ok(await client.createCollection({ collection_name: NAME, dimension: DIM }), 'create');
  ok(await client.loadCollectionSync({ collection_name: NAME }), 'load');

  const subjects = ['history', 'biology', 'math'];
  const rows = [];
  for (let i = 0; i < N; i++) {
    const vector = [];
    for (let d = 0; d < DIM; d++) vector.push(rand());
    rows.push({ id: i, vector, text: `document ${i}`, subject: subjects[i % 3] });
  }
  const ins = ok(await client.insert({ collection_name: NAME, data: rows }), 'insert');
  check(Number(ins.insert_cnt) === N, `insert count ${ins.insert_cnt}`);

  const q = rows[5].vector.map((x) => x + 0.01);
  let res = ok(
    await client.search({ collection_name: NAME, data: q, limit: 5, output_fields: ['text', 'subject'] }),
    'search',
  );
  checkHits(res.results, oracle(rows, q, 5), 'search');
  for (const h of res.results) {
    check(h.text === `document ${Number(h.id)}`, `text of ${h.id}: ${JSON.stringify(h)}`);
  }

  res = ok(
    await client.search({
      collection_name: NAME,
      data: q,
      limit: 4,
      filter: "subject == 'history'",
      output_fields: ['subject'],
    }),
    'filtered search',
  );
  checkHits(res.results, oracle(rows, q, 4, (r) => r.subject === 'history'), 'filtered search');

  res = ok(
    await client.query({ collection_name: NAME, filter: "subject == 'math'", output_fields: ['text'] }),
    'query',
  );
  const math = rows.filter((r) => r.subject === 'math').map((r) => r.id);
  check(
    JSON.stringify(res.data.map((r) => Number(r.id)).sort((a, b) => a - b)) === JSON.stringify(math),
    `query ids ${JSON.stringify(res.data)}`,
  );

  res = ok(await client.get({ collection_name: NAME, ids: [0, 2], output_fields: ['text'] }), 'get');
  check(
    JSON.stringify(res.data.map((r) => dyn(r, 'text')).sort()) ===
      JSON.stringify(['document 0', 'document 2']),
    `get ${JSON.stringify(res.data)}`,
  );

  res = ok(await client.delete({ collection_name: NAME, ids: [0, 2] }), 'delete by ids');
  check(Number(res.delete_cnt) === 2, `delete count ${res.delete_cnt}`);
  res = ok(await client.delete({ collection_name: NAME, filter: "subject == 'biology'" }), 'delete by filter');
  const live = rows.filter((r) => r.id !== 0 && r.id !== 2 && r.subject !== 'biology');
  res = ok(
    await client.query({ collection_name: NAME, filter: '', output_fields: ['count(*)'] }),
    'count',
  );
  check(Number(res.data[0]['count(*)']) === live.length, `count ${JSON.stringify(res.data)}`);
  res = ok(await client.search({ collection_name: NAME, data: q, limit: 10 }), 'search after delete');
  checkHits(res.results, oracle(live, q, 10), 'search after delete');

  const alias = await client.createAlias({ collection_name: NAME, alias: 'a1' });
  check(
    alias.error_code !== 'Success' && /not supported by Shoal/.test(alias.reason),
    `createAlias: ${JSON.stringify(alias)}`,
  );

  ok(await client.dropCollection({ collection_name: NAME }), 'drop');
  await client.closeConnection();
  console.log('node quickstart: all checks passed');
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
