// The client matrix's scenarios for nats.js; see tests/clients/README.md.
import {
  connect,
  headers,
  NoRespondersError,
  RequestError,
} from "@nats-io/transport-node";
import { AckPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const PUB_URL = env("CB_PUB_URL");
const SUB_URL = env("CB_SUB_URL");
const TLS_PUB_URL = env("CB_TLS_PUB_URL");
const TLS_SUB_URL = env("CB_TLS_SUB_URL");
const CA = env("CB_CA");
const P = env("CB_PREFIX");
const STREAM = env("CB_STREAM");
const BUCKET = env("CB_BUCKET");
// Outside every subject the observer records, so the server can answer no-responders.
const NOBODY = env("CB_NOBODY");

const SCENARIOS = [
  "pubsub_0", "pubsub_1", "pubsub_1k", "pubsub_64k", "pubsub_max", "order",
  "headers_payload", "headers_empty", "request_reply", "no_responders",
  "queue_group", "js_publish", "js_publish_options", "js_dedup",
  "js_pull_fetch_ack", "kv_put_get", "kv_delete", "kv_watch", "tls",
];
// One scenario may not take more than this, so the whole run stays under the harness's limit.
const SCENARIO_MS = 20_000;
// How long to keep listening after the expected messages, to catch extras.
const SETTLE_MS = 300;

const enc = new TextEncoder();
const dec = new TextDecoder();
const log = (...a) => console.error(...a);

function fail(why) {
  throw new Error(why);
}

function check(cond, why) {
  if (!cond) fail(why);
}

// n bytes; anything longer than 4 bytes carries the marker so the observer can spot leaks.
function payload(n, seed = 0) {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + 11) & 0xff;
  if (n > 4) b.set(enc.encode("cbmx"), 0);
  return b;
}

function sameBytes(a, b) {
  if (!a || !b || a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function describe(bytes) {
  if (!bytes) return "nothing";
  const head = dec.decode(bytes.subarray(0, 40)).replace(/[^\x20-\x7e]/g, ".");
  return `${bytes.length} bytes "${head}"`;
}

function withTimeout(promise, ms, what) {
  let timer;
  const t = new Promise((_, rej) => {
    timer = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

// Subscribes and resolves with the messages once `n` arrived and SETTLE_MS more passed (so
// duplicates or extras show up), or rejects after `ms` with what it had.
async function collector(nc, subject, n, ms = 10_000, opts = {}) {
  const got = [];
  let resolve, reject;
  const done = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  const sub = nc.subscribe(subject, {
    ...opts,
    callback: (err, m) => {
      if (err) return reject(err);
      got.push(m);
      if (got.length === n) setTimeout(() => resolve(got), SETTLE_MS);
    },
  });
  // The subscription must be known to the server before anyone publishes.
  await nc.flush();
  const wait = async () => {
    try {
      return await withTimeout(done, ms, `${got.length} of ${n} messages on ${subject}`);
    } finally {
      sub.unsubscribe();
    }
  };
  return { got, wait };
}

async function pubsubOne(pub, sub, subject, data) {
  const c = await collector(sub, subject, 1);
  pub.publish(subject, data);
  await pub.flush();
  const got = await c.wait();
  check(got.length === 1, `expected 1 message, got ${got.length}`);
  const m = got[0];
  check(m.subject === subject, `subject ${m.subject}`);
  check(sameBytes(m.data, data), `sent ${describe(data)}, got ${describe(m.data)}`);
}

async function requestReply(pub, sub, subject) {
  const seen = [];
  const responder = sub.subscribe(subject, {
    callback: (err, m) => {
      if (err) return;
      seen.push(m.data);
      m.respond(enc.encode(`cbmx reply to ${dec.decode(m.data)}`));
    },
  });
  await sub.flush();
  try {
    const req = enc.encode("cbmx ping 42");
    const r = await pub.request(subject, req, { timeout: 5000 });
    const want = enc.encode("cbmx reply to cbmx ping 42");
    check(seen.length === 1, `responder saw ${seen.length} requests`);
    check(sameBytes(seen[0], req), `responder got ${describe(seen[0])}`);
    check(sameBytes(r.data, want), `reply was ${describe(r.data)}`);
  } finally {
    responder.unsubscribe();
  }
}

async function streamState(jsm) {
  return (await jsm.streams.info(STREAM)).state;
}

function checkAck(ack, seq, duplicate) {
  check(ack.stream === STREAM, `ack stream ${ack.stream}, want ${STREAM}`);
  check(ack.seq === seq, `ack seq ${ack.seq}, want ${seq}`);
  check(!!ack.duplicate === duplicate, `ack duplicate ${ack.duplicate}, want ${duplicate}`);
}

// Reads `n` entries from an async iterator, each within `ms`.
async function take(iterable, n, ms, what) {
  const it = iterable[Symbol.asyncIterator]();
  const out = [];
  while (out.length < n) {
    const r = await withTimeout(it.next(), ms, `${what}: ${out.length} of ${n}`);
    if (r.done) fail(`${what}: ended after ${out.length} of ${n}`);
    out.push(r.value);
  }
  return out;
}

const ctx = {};

const scenarios = {
  pubsub_0: () => pubsubOne(ctx.pub, ctx.sub, `${P}.ps.0`, payload(0)),
  pubsub_1: () => pubsubOne(ctx.pub, ctx.sub, `${P}.ps.1`, payload(1)),
  pubsub_1k: () => pubsubOne(ctx.pub, ctx.sub, `${P}.ps.1k`, payload(1024)),
  pubsub_64k: () => pubsubOne(ctx.pub, ctx.sub, `${P}.ps.64k`, payload(65536)),

  async pubsub_max() {
    const max = ctx.pub.info?.max_payload;
    check(Number.isInteger(max) && max > 4, `max_payload in INFO is ${max}`);
    log(`max_payload ${max}`);
    await pubsubOne(ctx.pub, ctx.sub, `${P}.ps.max`, payload(max, 3));
  },

  async order() {
    const n = 1000;
    const subject = `${P}.order`;
    const c = await collector(ctx.sub, subject, n, 15_000);
    for (let i = 0; i < n; i++) ctx.pub.publish(subject, enc.encode(`cbmx ${i}`));
    await ctx.pub.flush();
    const got = await c.wait();
    check(got.length === n, `got ${got.length} of ${n}`);
    got.forEach((m, i) => {
      const s = dec.decode(m.data);
      check(s === `cbmx ${i}`, `message ${i} is "${s}"`);
    });
  },

  async headers_payload() {
    const subject = `${P}.hdr.payload`;
    const c = await collector(ctx.sub, subject, 1);
    const h = headers();
    h.append("X-Cb-Multi", "first");
    h.append("X-Cb-Multi", "second");
    h.set("Nats-Msg-Id", "mx-hdr-1");
    const data = payload(200, 5);
    ctx.pub.publish(subject, data, { headers: h });
    await ctx.pub.flush();
    const [m] = await c.wait();
    check(m.headers, "no headers arrived");
    const multi = m.headers.values("X-Cb-Multi");
    check(
      multi.length === 2 && multi[0] === "first" && multi[1] === "second",
      `X-Cb-Multi is ${JSON.stringify(multi)}`,
    );
    check(m.headers.get("Nats-Msg-Id") === "mx-hdr-1", `Nats-Msg-Id is ${m.headers.get("Nats-Msg-Id")}`);
    check(sameBytes(m.data, data), `payload ${describe(m.data)}`);
  },

  async headers_empty() {
    const subject = `${P}.hdr.empty`;
    const c = await collector(ctx.sub, subject, 1);
    const h = headers();
    h.set("X-Cb-Only", "just-headers");
    ctx.pub.publish(subject, new Uint8Array(0), { headers: h });
    await ctx.pub.flush();
    const [m] = await c.wait();
    check(m.headers, "no headers arrived");
    check(m.headers.get("X-Cb-Only") === "just-headers", `X-Cb-Only is ${m.headers.get("X-Cb-Only")}`);
    check(m.data.length === 0, `payload ${describe(m.data)}`);
  },

  request_reply: () => requestReply(ctx.pub, ctx.sub, `${P}.rr`),

  async no_responders() {
    const start = Date.now();
    try {
      await ctx.pub.request(NOBODY, enc.encode("cbmx anyone"), { timeout: 2000 });
    } catch (err) {
      const took = Date.now() - start;
      const nr = err instanceof NoRespondersError ||
        (err instanceof RequestError && err.isNoResponders());
      check(nr, `wrong error: ${err?.constructor?.name}: ${err?.message}`);
      check(took < 2000, `took ${took} ms`);
      return;
    }
    fail("the request got a reply");
  },

  async queue_group() {
    const subject = `${P}.queue`;
    const n = 100;
    const got = [];
    const per = [0, 0];
    let resolve;
    const all = new Promise((res) => (resolve = res));
    const subs = [0, 1].map((k) =>
      ctx.sub.subscribe(subject, {
        queue: "mxq",
        callback: (err, m) => {
          if (err) return;
          per[k]++;
          got.push(dec.decode(m.data));
          if (got.length === n) setTimeout(resolve, SETTLE_MS);
        },
      })
    );
    await ctx.sub.flush();
    try {
      for (let i = 0; i < n; i++) ctx.pub.publish(subject, enc.encode(`cbmx q ${i}`));
      await ctx.pub.flush();
      await withTimeout(all, 10_000, `${got.length} of ${n} queue messages`);
    } finally {
      subs.forEach((s) => s.unsubscribe());
    }
    check(got.length === n, `got ${got.length} deliveries for ${n} messages`);
    const distinct = new Set(got);
    check(distinct.size === n, `${n - distinct.size} duplicates`);
    for (let i = 0; i < n; i++) check(distinct.has(`cbmx q ${i}`), `lost message ${i}`);
    log(`queue split ${per[0]}/${per[1]}`);
  },

  async js_publish() {
    const before = await streamState(ctx.jsm);
    const data = payload(64, 7);
    const ack = await ctx.js.publish(`${P}.js.plain`, data);
    checkAck(ack, before.last_seq + 1, false);
    const after = await streamState(ctx.jsm);
    check(after.messages === before.messages + 1, `stream holds ${after.messages}, was ${before.messages}`);
  },

  async js_publish_options() {
    const before = await streamState(ctx.jsm);
    const ack = await ctx.js.publish(`${P}.js.opts`, enc.encode("cbmx with options"), {
      msgID: "mx-opts-1",
      expect: { streamName: STREAM, lastSequence: before.last_seq },
    });
    checkAck(ack, before.last_seq + 1, false);
    // A wrong expectation must be refused, which shows the options reached the server.
    let refused = false;
    try {
      await ctx.js.publish(`${P}.js.opts`, enc.encode("cbmx wrong expectation"), {
        expect: { lastSequence: before.last_seq },
      });
    } catch (err) {
      refused = true;
      log(`wrong expectation refused: ${err.message}`);
    }
    check(refused, "a publish with a wrong expected last sequence was acknowledged");
  },

  async js_dedup() {
    const before = await streamState(ctx.jsm);
    const subject = `${P}.js.dedup`;
    const first = await ctx.js.publish(subject, enc.encode("cbmx dedup one"), { msgID: "mx-dedup-1" });
    checkAck(first, before.last_seq + 1, false);
    const second = await ctx.js.publish(subject, enc.encode("cbmx dedup two"), { msgID: "mx-dedup-1" });
    checkAck(second, first.seq, true);
    const info = await ctx.jsm.streams.info(STREAM, { subjects_filter: subject });
    const copies = info.state.subjects?.[subject] ?? 0;
    check(copies === 1, `the stream holds ${copies} copies`);
    check(info.state.messages === before.messages + 1, `stream holds ${info.state.messages}, was ${before.messages}`);
  },

  async js_pull_fetch_ack() {
    const subject = `${P}.js.pull`;
    const n = 5;
    const sent = [];
    for (let i = 0; i < n; i++) {
      const data = enc.encode(`cbmx pull ${i}`);
      const ack = await ctx.js.publish(subject, data);
      sent.push({ data, seq: ack.seq });
    }
    const jsmSub = await jetstreamManager(ctx.sub);
    await jsmSub.consumers.add(STREAM, {
      durable_name: "mx_pull",
      ack_policy: AckPolicy.Explicit,
      filter_subject: subject,
    });
    const consumer = await jetstream(ctx.sub).consumers.get(STREAM, "mx_pull");
    const iter = await consumer.fetch({ max_messages: n, expires: 5000 });
    const got = [];
    for await (const m of iter) {
      got.push(m);
      check(await m.ackAck({ timeout: 5000 }), `ack of ${m.seq} not confirmed`);
      if (got.length === n) break;
    }
    check(got.length === n, `fetched ${got.length} of ${n}`);
    got.forEach((m, i) => {
      check(m.subject === subject, `subject ${m.subject}`);
      check(m.seq === sent[i].seq, `message ${i} has stream seq ${m.seq}, want ${sent[i].seq}`);
      check(m.info.stream === STREAM, `message ${i} from stream ${m.info.stream}`);
      check(sameBytes(m.data, sent[i].data), `message ${i} is ${describe(m.data)}`);
    });
    const ci = await jsmSub.consumers.info(STREAM, "mx_pull");
    check(ci.num_pending === 0, `num_pending ${ci.num_pending}`);
    check(ci.num_ack_pending === 0, `num_ack_pending ${ci.num_ack_pending}`);
    check(ci.ack_floor.stream_seq === sent[n - 1].seq, `ack floor ${ci.ack_floor.stream_seq}`);
  },

  async kv_put_get() {
    const data = enc.encode("cbmx value one");
    const rev = await ctx.kv.put("k1", data);
    const e = await ctx.kvSub().then((kv) => kv.get("k1"));
    check(e, "no entry");
    check(e.key === "k1", `key ${e.key}`);
    check(e.operation === "PUT", `operation ${e.operation}`);
    check(e.revision === rev, `revision ${e.revision}, put said ${rev}`);
    check(sameBytes(e.value, data), `value ${describe(e.value)}`);
  },

  async kv_delete() {
    const kvSub = await ctx.kvSub();
    const data = enc.encode("cbmx soon gone");
    const rev = await ctx.kv.put("gone", data);
    const e = await kvSub.get("gone");
    check(e && e.revision === rev && sameBytes(e.value, data), "the key was not there before the delete");
    await ctx.kv.delete("gone");
    const d = await kvSub.get("gone");
    check(
      d === null || d.operation === "DEL" || d.operation === "PURGE",
      `after delete: ${d?.operation} ${describe(d?.value)}`,
    );
    check(d === null || d.revision > rev, `delete marker revision ${d?.revision}`);
  },

  async kv_watch() {
    const kvSub = await ctx.kvSub();
    const w = await kvSub.watch({ key: "w.>" });
    await ctx.sub.flush();
    try {
      const n = 5;
      const revs = [];
      for (let i = 0; i < n; i++) revs.push(await ctx.kv.put(`w.${i}`, enc.encode(`cbmx watch ${i}`)));
      const got = await take(w, n, 5000, "watch");
      got.forEach((e, i) => {
        check(e.key === `w.${i}`, `entry ${i} key ${e.key}`);
        check(e.operation === "PUT", `entry ${i} operation ${e.operation}`);
        check(e.revision === revs[i], `entry ${i} revision ${e.revision}, want ${revs[i]}`);
        check(dec.decode(e.value) === `cbmx watch ${i}`, `entry ${i} value ${describe(e.value)}`);
      });
    } finally {
      w.stop();
    }
  },

  async tls() {
    const opts = (url) => ({ servers: url, tls: { caFile: CA }, timeout: 10_000 });
    const pub = await connect(opts(TLS_PUB_URL));
    const sub = await connect(opts(TLS_SUB_URL));
    try {
      await pubsubOne(pub, sub, `${P}.tls.1k`, payload(1024, 9));
      await requestReply(pub, sub, `${P}.tls.rr`);
    } finally {
      await Promise.allSettled([pub.close(), sub.close()]);
    }
  },
};

async function setup() {
  const opts = (url, name) => ({ servers: url, name, timeout: 10_000 });
  ctx.pub = await connect(opts(PUB_URL, "mx-js-pub"));
  ctx.sub = await connect(opts(SUB_URL, "mx-js-sub"));
  ctx.jsm = await jetstreamManager(ctx.pub);
  ctx.js = jetstream(ctx.pub);
  // Left over from an earlier run against the same server.
  await ctx.jsm.streams.delete(STREAM).catch(() => {});
  await ctx.jsm.streams.delete(`KV_${BUCKET}`).catch(() => {});
  await ctx.jsm.streams.add({ name: STREAM, subjects: [`${P}.js.>`] });
  ctx.kv = await new Kvm(ctx.pub).create(BUCKET, { history: 5 });
  let kvSub;
  ctx.kvSub = async () => (kvSub ??= await new Kvm(ctx.sub).open(BUCKET));
}

async function main() {
  // Whatever hangs, report and leave before the harness's limit.
  const reported = new Set();
  const watchdog = setTimeout(() => {
    for (const name of SCENARIOS) if (!reported.has(name)) console.log(`fail ${name}: the program ran out of time`);
    process.exit(1);
  }, 170_000);
  watchdog.unref();

  let failed = 0;
  let setupError = null;
  try {
    await withTimeout(setup(), 30_000, "setup");
  } catch (err) {
    setupError = err;
    log(err);
  }
  for (const name of SCENARIOS) {
    try {
      if (setupError) throw new Error(`setup: ${setupError.message}`);
      await withTimeout(scenarios[name](), SCENARIO_MS, name);
      console.log(`ok ${name}`);
    } catch (err) {
      failed++;
      log(`${name}:`, err);
      console.log(`fail ${name}: ${String(err?.message ?? err).replace(/\s+/g, " ")}`);
    }
    reported.add(name);
  }
  await withTimeout(
    Promise.allSettled([ctx.pub?.close(), ctx.sub?.close()]),
    5000,
    "close",
  ).catch(() => {});
  process.exit(failed === 0 ? 0 : 1);
}

main();
