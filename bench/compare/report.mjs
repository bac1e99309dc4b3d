// The table of scripts/compare.sh from its per-run JSON lines
// ({system, run, cores_server, cores_total, bench: postline-bench's JSON}).
//
//   node report.mjs results.jsonl          # markdown: medians, then every run
//   node report.mjs --line results.jsonl   # one line about the last run

import { readFileSync } from 'node:fs';

const args = process.argv.slice(2);
const lineOnly = args[0] === '--line';
const file = lineOnly ? args[1] : args[0];
const rows = readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));

const LABELS = {
  postline: 'Postline (`serve`, persistence on)',
  'postline-no-worker': 'Postline `serve --no-worker` (enqueue only)',
  'node-bullmq': 'Node + Socket.IO + BullMQ/Redis → Postgres',
  node: 'Node + Socket.IO, no persistence',
  socketioxide: 'socketioxide (Rust Socket.IO), no persistence',
};

const ms = (us) => (us == null ? null : us / 1000);
const fmt = (v, digits = 2) => (v == null || Number.isNaN(v) ? '–' : v.toFixed(digits));
const median = (xs) => {
  const v = xs.filter((x) => x != null && !Number.isNaN(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};

function facts(r) {
  const b = r.bench;
  // No latency at all (every connection failed): no numbers to take a median of.
  if (!b || !b.latency_us.samples) return { failed: true, problem: b && (b.failure_sample || b.error_sample) };
  return {
    p50: ms(b.latency_us.p50),
    p99: ms(b.latency_us.p99),
    p999: ms(b.latency_us.p99_9),
    samples: b.latency_us.samples,
    deliveries: b.deliveries_per_s,
    persisted: b.persisted_per_s,
    server: r.cores_server,
    total: r.cores_total,
    benchCpu: b.server_cpu_cores,
    rss: b.server_rss_kib,
    errors: b.errors,
    failedConnections: b.failed_connections,
    problem: b.error_sample || b.failure_sample,
  };
}

if (lineOnly) {
  const f = facts(rows[rows.length - 1]);
  if (f.failed) console.log(`failed${f.problem ? `: ${f.problem}` : ''}`);
  else {
    console.log(
      `p50 ${fmt(f.p50)} ms, p99 ${fmt(f.p99)} ms, deliveries/s ${fmt(f.deliveries, 0)}, persisted/s ${fmt(f.persisted, 0)}, ` +
        `cores ${fmt(f.total)} (server ${fmt(f.server)}; bench saw ${fmt(f.benchCpu)}), errors ${f.errors}, failed connections ${f.failedConnections}` +
        (f.problem ? ` (${f.problem})` : ''),
    );
  }
  process.exit(0);
}

const order = [...new Set(rows.map((r) => r.system))].sort(
  (a, b) => Object.keys(LABELS).indexOf(a) - Object.keys(LABELS).indexOf(b),
);
const first = rows.find((r) => r.bench)?.bench;
if (first) {
  console.log(
    `\nS1 over Socket.IO: ${first.connections} connections, ${first.conversations} conversations, ` +
      `${first.senders} senders at ${first.rate_per_sender} msg/s, ${first.payload} B, ${first.duration_s} s measured; medians of the runs.\n`,
  );
}
console.log('| system | runs | p50 ms | p99 ms | cores used (total) | server | its Postgres/Redis | deliveries/s | persisted/s | errors | failed connections |');
console.log('|---|---|---|---|---|---|---|---|---|---|---|');
for (const sys of order) {
  const fs = rows.filter((r) => r.system === sys).map(facts);
  const ok = fs.filter((f) => !f.failed);
  const med = (k) => median(ok.map((f) => f[k]));
  const sum = (k) => ok.reduce((a, f) => a + (f[k] || 0), 0);
  const others = median(ok.map((f) => (f.total == null || f.server == null ? null : f.total - f.server)));
  console.log(
    `| ${LABELS[sys] || sys} | ${ok.length}${fs.length > ok.length ? ` (+${fs.length - ok.length} failed)` : ''} | ` +
      `${fmt(med('p50'))} | ${fmt(med('p99'))} | ${fmt(med('total'))} | ${fmt(med('server'))} | ${fmt(others)} | ` +
      `${fmt(med('deliveries'), 0)} | ${fmt(med('persisted'), 0)} | ${sum('errors')} | ${sum('failedConnections')} |`,
  );
}
console.log('\nEvery run, in the order run (p50 / p99 ms, cores total / server):\n');
for (const sys of order) {
  const parts = rows
    .filter((r) => r.system === sys)
    .map((r) => {
      const f = facts(r);
      return f.failed ? `run ${r.run} failed${f.problem ? ` (${f.problem})` : ''}` : `${fmt(f.p50)}/${fmt(f.p99)} (${fmt(f.total)}/${fmt(f.server)})`;
    });
  console.log(`- ${LABELS[sys] || sys}: ${parts.join(', ')}`);
}
