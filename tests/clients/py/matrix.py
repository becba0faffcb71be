"""The client matrix's scenarios for nats-py; see tests/clients/README.md."""

import asyncio
import os
import ssl
import sys
import time
import traceback

import nats
import nats.errors
import nats.js.errors

PUB_URL = os.environ["CB_PUB_URL"]
SUB_URL = os.environ["CB_SUB_URL"]
TLS_PUB_URL = os.environ["CB_TLS_PUB_URL"]
TLS_SUB_URL = os.environ["CB_TLS_SUB_URL"]
CA = os.environ["CB_CA"]
P = os.environ["CB_PREFIX"]
STREAM = os.environ["CB_STREAM"]
BUCKET = os.environ["CB_BUCKET"]
# Outside every space the observer subscribes to, so the server really has no interest in it.
NOBODY = os.environ.get("CB_NOBODY", f"nobody.{P}")

# Generous: a loaded machine can be slow, but no wait may approach the harness's 180 s.
WAIT = 10
SCENARIO_TIMEOUT = 30

SCENARIOS = [
    "pubsub_0",
    "pubsub_1",
    "pubsub_1k",
    "pubsub_64k",
    "pubsub_max",
    "order",
    "headers_payload",
    "headers_empty",
    "request_reply",
    "no_responders",
    "queue_group",
    "js_publish",
    "js_publish_options",
    "js_dedup",
    "js_pull_fetch_ack",
    "kv_put_get",
    "kv_delete",
    "kv_watch",
    "tls",
]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class Fail(Exception):
    pass


def check(cond, why):
    if not cond:
        raise Fail(why)


def payload(n):
    """n bytes: the marker first, then every byte value (CR and LF included, to test framing)."""
    if n <= 4:
        return b"x" * n
    body = b"cbmx" + bytes(range(256)) * (n // 256 + 1)
    return body[:n]


def short(b):
    return repr(b[:40]) + (f"...({len(b)} B)" if len(b) > 40 else "")


class HeaderLines:
    """Header lines in order, repeats allowed.

    nats-py takes headers as a dict; its publish only iterates `.items()`, so this is how one
    name gets two values without changing the client.
    """

    def __init__(self, pairs):
        self.pairs = list(pairs)

    def items(self):
        return list(self.pairs)


def tap_raw_headers(nc, store):
    """Records the raw header block of every message on our subjects.

    nats-py's parsed headers keep one value per name, so a repeated name can only be checked
    in the bytes the client received.
    """
    orig = nc._process_msg
    want = f"{P}.hdr".encode()

    async def tapped(sid, subject, reply, data, headers):
        subj = bytes(subject)
        if headers and subj.startswith(want):
            store.setdefault(subj.decode(), []).append(bytes(headers))
        return await orig(sid, subject, reply, data, headers)

    nc._process_msg = tapped


async def settle(nc):
    """A flush that really comes after everything sent before it.

    nats-py 2.16.0 writes PING straight to the socket while SUB and PUB wait in its buffer for
    the flusher task, so a PONG can return before an earlier SUB was even sent. Waiting for the
    buffer to empty first puts the PING behind them.
    """
    deadline = time.monotonic() + WAIT
    while nc.pending_data_size > 0:
        check(time.monotonic() < deadline, "the client's write buffer did not empty")
        await asyncio.sleep(0.001)
    await nc.flush(timeout=WAIT)


async def err_cb(e):
    log("nats error:", repr(e))


async def connect(url, name, tls=None):
    opts = dict(
        servers=[url],
        name=name,
        connect_timeout=WAIT,
        allow_reconnect=False,
        error_cb=err_cb,
    )
    if tls is not None:
        opts["tls"] = tls
    return await nats.connect(**opts)


class Matrix:
    def __init__(self, pub, sub):
        self.pub = pub
        self.sub = sub
        self.pjs = pub.jetstream(timeout=WAIT)
        self.sjs = sub.jetstream(timeout=WAIT)
        self.raw_headers = {}
        tap_raw_headers(sub, self.raw_headers)
        self._stream = None
        self._kv = None

    async def stream(self):
        if self._stream is None:
            self._stream = await self.pjs.add_stream(name=STREAM, subjects=[f"{P}.js.>"])
        return self._stream

    async def kv(self):
        if self._kv is None:
            self._kv = await self.pjs.create_key_value(bucket=BUCKET, history=5)
        return self._kv

    # --- core NATS

    async def one_message(self, subject, data, headers=None, pub=None, sub=None):
        """Publishes one message and returns it as the subscriber got it."""
        pub = pub or self.pub
        sub = sub or self.sub
        s = await sub.subscribe(subject)
        try:
            # The subscription must reach the server before anything is published.
            await settle(sub)
            await pub.publish(subject, data, headers=headers)
            await settle(pub)
            msg = await s.next_msg(timeout=WAIT)
            # Exactly one copy: nothing else may follow.
            try:
                extra = await s.next_msg(timeout=0.2)
                raise Fail(f"a second message arrived: {short(extra.data)}")
            except nats.errors.TimeoutError:
                pass
            return msg
        finally:
            await s.unsubscribe()

    async def pubsub(self, n, pub=None, sub=None):
        data = payload(n)
        msg = await self.one_message(f"{P}.pubsub.{n}", data, pub=pub, sub=sub)
        check(len(msg.data) == n, f"got {len(msg.data)} B, sent {n} B")
        check(msg.data == data, f"bytes differ: got {short(msg.data)}, sent {short(data)}")

    async def pubsub_0(self):
        await self.pubsub(0)

    async def pubsub_1(self):
        await self.pubsub(1)

    async def pubsub_1k(self):
        await self.pubsub(1024)

    async def pubsub_64k(self):
        await self.pubsub(65536)

    async def pubsub_max(self):
        n = self.pub.max_payload
        check(n > 1024, f"the publishing connection was told max_payload {n}")
        log("pubsub_max: max_payload", n)
        await self.pubsub(n)

    async def order(self):
        subject = f"{P}.order"
        count = 1000
        s = await self.sub.subscribe(subject)
        try:
            await settle(self.sub)
            sent = [f"cbmx {i:04d}".encode() for i in range(count)]
            for d in sent:
                await self.pub.publish(subject, d)
            await settle(self.pub)
            got = []
            while len(got) < count:
                try:
                    got.append((await s.next_msg(timeout=WAIT)).data)
                except nats.errors.TimeoutError:
                    raise Fail(f"only {len(got)} of {count} arrived")
            for i, (g, w) in enumerate(zip(got, sent)):
                check(g == w, f"message {i} is {short(g)}, expected {short(w)}")
        finally:
            await s.unsubscribe()

    async def headers_check(self, subject, data, pairs):
        msg = await self.one_message(subject, data, headers=HeaderLines(pairs))
        check(msg.data == data, f"payload differs: got {short(msg.data)}, sent {short(data)}")
        check(msg.headers is not None, "no headers arrived")
        # The parsed view: one value per name, the last one sent.
        want = {}
        for k, v in pairs:
            want[k] = v
        for k, v in want.items():
            check(msg.headers.get(k) == v, f"header {k}: got {msg.headers.get(k)!r}, sent {v!r}")
        # The raw view: every line sent, in the order sent.
        raws = self.raw_headers.pop(subject, [])
        check(len(raws) == 1, f"{len(raws)} raw header blocks arrived")
        raw = raws[0]
        check(raw.startswith(b"NATS/1.0\r\n"), f"raw headers start {raw[:20]!r}")
        lines = [l for l in raw[len(b"NATS/1.0\r\n"):].split(b"\r\n") if l]
        sent = [f"{k}: {v}".encode() for k, v in pairs]
        ours = [l for l in lines if l in sent]
        check(ours == sent, f"header lines arrived as {lines}, sent {sent}")

    async def headers_payload(self):
        await self.headers_check(
            f"{P}.hdr.payload",
            b"cbmx payload with headers",
            [
                ("X-Mx-Multi", "first value"),
                ("X-Mx-Multi", "second value"),
                ("Nats-Msg-Id", "py-hdr-1"),
                ("X-Mx-Single", "solo"),
            ],
        )

    async def headers_empty(self):
        await self.headers_check(
            f"{P}.hdr.empty",
            b"",
            [("X-Mx-Only", "headers, no payload"), ("X-Mx-Two", "2")],
        )

    async def request_reply(self, pub=None, sub=None):
        pub = pub or self.pub
        sub = sub or self.sub
        subject = f"{P}.svc"
        asked = []

        async def serve(msg):
            asked.append(msg.data)
            await msg.respond(b"cbmx reply to " + msg.data)

        s = await sub.subscribe(subject, cb=serve)
        try:
            await settle(sub)
            question = b"cbmx question " + bytes(range(256))
            reply = await pub.request(subject, question, timeout=WAIT)
            check(asked == [question], f"the responder got {[short(a) for a in asked]}")
            want = b"cbmx reply to " + question
            check(reply.data == want, f"reply {short(reply.data)}, expected {short(want)}")
        finally:
            await s.unsubscribe()

    async def no_responders(self):
        start = time.monotonic()
        try:
            # A timeout far past 2 s, so a missing 503 shows as a slow timeout, not a pass.
            msg = await self.pub.request(NOBODY, b"cbmx anyone?", timeout=WAIT)
            raise Fail(f"got a reply: {short(msg.data)} headers {msg.headers}")
        except nats.errors.NoRespondersError:
            pass
        except nats.errors.TimeoutError:
            raise Fail(f"timed out after {time.monotonic() - start:.1f} s instead of no responders")
        took = time.monotonic() - start
        check(took < 2, f"no responders took {took:.2f} s")

    async def queue_group(self):
        subject = f"{P}.queue"
        count = 100
        got = {0: [], 1: []}

        def handler(i):
            async def cb(msg):
                got[i].append(msg.data)

            return cb

        subs = [await self.sub.subscribe(subject, queue="mx-workers", cb=handler(i)) for i in (0, 1)]
        try:
            await settle(self.sub)
            sent = [f"cbmx job {i:03d}".encode() for i in range(count)]
            for d in sent:
                await self.pub.publish(subject, d)
            await settle(self.pub)
            deadline = time.monotonic() + WAIT
            while len(got[0]) + len(got[1]) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            # Anything late would be a duplicate; give it a moment to show.
            await asyncio.sleep(0.3)
            all_got = got[0] + got[1]
            check(len(all_got) == count, f"{len(all_got)} deliveries for {count} messages")
            check(len(set(all_got)) == count, "some message was delivered twice")
            check(set(all_got) == set(sent), "the deliveries are not the messages sent")
            log(f"queue_group: {len(got[0])} + {len(got[1])}")
        finally:
            for s in subs:
                await s.unsubscribe()

    # --- JetStream

    async def js_publish(self):
        await self.stream()
        before = (await self.pjs.stream_info(STREAM)).state.last_seq
        subject = f"{P}.js.plain"
        data = b"cbmx plain js publish"
        ack = await self.pjs.publish(subject, data)
        check(ack.stream == STREAM, f"ack names stream {ack.stream!r}")
        check(ack.seq == before + 1, f"ack seq {ack.seq}, expected {before + 1}")
        check(not ack.duplicate, "ack says duplicate")
        stored = await self.sjs.get_msg(STREAM, seq=ack.seq)
        check(stored.subject == subject, f"seq {ack.seq} holds subject {stored.subject}")
        check(stored.data == data, f"seq {ack.seq} holds {short(stored.data or b'')}")

    async def js_publish_options(self):
        await self.stream()
        last = (await self.pjs.stream_info(STREAM)).state.last_seq
        subject = f"{P}.js.options"
        ack = await self.pjs.publish(
            subject,
            b"cbmx js publish with options",
            stream=STREAM,
            headers={"Nats-Expected-Last-Sequence": str(last), "Nats-Msg-Id": "py-opt-1"},
        )
        check(ack.stream == STREAM, f"ack names stream {ack.stream!r}")
        check(ack.seq == last + 1, f"ack seq {ack.seq}, expected {last + 1}")
        check(not ack.duplicate, "ack says duplicate")
        # The options were really carried: wrong expectations are refused.
        try:
            await self.pjs.publish(
                subject,
                b"cbmx stale expectation",
                headers={"Nats-Expected-Last-Sequence": str(last)},
            )
            raise Fail("a stale expected last sequence was accepted")
        except nats.js.errors.APIError as e:
            check(e.err_code == 10071, f"stale last sequence: {e!r}")
        try:
            await self.pjs.publish(subject, b"cbmx wrong stream", stream=STREAM + "_NOPE")
            raise Fail("a wrong expected stream was accepted")
        except nats.js.errors.APIError as e:
            check(e.err_code == 10060, f"wrong expected stream: {e!r}")
        state = (await self.pjs.stream_info(STREAM)).state
        check(state.last_seq == last + 1, f"stream last seq {state.last_seq}, expected {last + 1}")

    async def js_dedup(self):
        await self.stream()
        subject = f"{P}.js.dedup"
        hdr = {"Nats-Msg-Id": "py-dedup-1"}
        first = b"cbmx dedup first"
        a1 = await self.pjs.publish(subject, first, headers=dict(hdr))
        a2 = await self.pjs.publish(subject, b"cbmx dedup second", headers=dict(hdr))
        check(not a1.duplicate, "the first ack says duplicate")
        check(a2.duplicate is True, f"the second ack says duplicate={a2.duplicate!r}")
        check(a2.stream == STREAM and a2.seq == a1.seq, f"acks {a1} and {a2}")
        info = await self.pjs.stream_info(STREAM, subjects_filter=subject)
        held = (info.state.subjects or {}).get(subject, 0)
        check(held == 1, f"the stream holds {held} copies")
        stored = await self.sjs.get_msg(STREAM, seq=a1.seq)
        check(stored.data == first, f"the stored copy is {short(stored.data or b'')}")

    async def js_pull_fetch_ack(self):
        await self.stream()
        subject = f"{P}.js.pull"
        sent = [f"cbmx pull {i}".encode() + bytes(range(i * 10)) for i in range(5)]
        seqs = [(await self.pjs.publish(subject, d)).seq for d in sent]
        psub = await self.sjs.pull_subscribe(subject, durable="py_pull", stream=STREAM)
        got = []
        deadline = time.monotonic() + WAIT
        while len(got) < len(sent) and time.monotonic() < deadline:
            try:
                got += await psub.fetch(len(sent) - len(got), timeout=2)
            except nats.errors.TimeoutError:
                pass
        check(len(got) == len(sent), f"fetched {len(got)} of {len(sent)}")
        for i, m in enumerate(got):
            check(m.data == sent[i], f"message {i} is {short(m.data)}, sent {short(sent[i])}")
            md = m.metadata
            check(md.stream == STREAM, f"message {i} metadata names stream {md.stream}")
            check(md.sequence.stream == seqs[i], f"message {i} stream seq {md.sequence.stream}")
            check(md.num_delivered == 1, f"message {i} delivered {md.num_delivered} times")
            await m.ack_sync(timeout=WAIT)
        ci = await self.sjs.consumer_info(STREAM, "py_pull")
        check(ci.num_ack_pending == 0, f"{ci.num_ack_pending} acks pending")
        check(ci.num_pending == 0, f"{ci.num_pending} messages pending")
        check(ci.ack_floor.stream_seq == seqs[-1], f"ack floor {ci.ack_floor.stream_seq}, expected {seqs[-1]}")
        await psub.unsubscribe()

    # --- KV

    async def kv_put_get(self):
        kv = await self.kv()
        value = b"cbmx kv value " + bytes(range(256))
        rev = await kv.put("greeting", value)
        skv = await self.sjs.key_value(BUCKET)
        e = await skv.get("greeting")
        check(e.key == "greeting", f"key {e.key}")
        check(e.value == value, f"value {short(e.value or b'')}")
        check(e.revision == rev, f"revision {e.revision}, put said {rev}")

    async def kv_delete(self):
        kv = await self.kv()
        rev = await kv.put("doomed", b"cbmx soon gone")
        skv = await self.sjs.key_value(BUCKET)
        e = await skv.get("doomed")
        check(e.value == b"cbmx soon gone" and e.revision == rev, f"before delete: {e}")
        await kv.delete("doomed")
        try:
            e = await skv.get("doomed")
            raise Fail(f"get after delete returned {e}")
        except nats.js.errors.KeyNotFoundError as err:
            check(getattr(err, "op", None) == "DEL", f"not found with op {getattr(err, 'op', None)!r}")

    async def kv_watch(self):
        kv = await self.kv()
        skv = await self.sjs.key_value(BUCKET)
        w = await skv.watch("watch.*")
        try:
            first = await w.updates(timeout=WAIT)
            check(first is None, f"a fresh watch began with {first}")
            puts = []
            for k, v in [("watch.a", b"cbmx A1"), ("watch.b", b"cbmx B1"), ("watch.a", b"cbmx A2")]:
                puts.append((k, v, await kv.put(k, v)))
            for i, (k, v, rev) in enumerate(puts):
                e = await w.updates(timeout=WAIT)
                check(e is not None, f"update {i} was the end marker")
                check(
                    (e.key, e.value, e.revision) == (k, v, rev),
                    f"update {i} is {e.key} {short(e.value or b'')} rev {e.revision}, expected {k} {v} rev {rev}",
                )
                check(e.operation is None, f"update {i} has operation {e.operation}")
            try:
                e = await w.updates(timeout=0.3)
                raise Fail(f"an extra update arrived: {e}")
            except nats.errors.TimeoutError:
                pass
        finally:
            await w.stop()

    # --- TLS

    async def tls(self):
        ctx = ssl.create_default_context(cafile=CA)
        tp = await connect(TLS_PUB_URL, "mx-py-tls-pub", tls=ctx)
        ts = await connect(TLS_SUB_URL, "mx-py-tls-sub", tls=ctx)
        try:
            check(tp.connected_url.scheme == "tls", f"connected to {tp.connected_url}")
            await self.pubsub(1024, pub=tp, sub=ts)
            await self.request_reply(pub=tp, sub=ts)
        finally:
            await tp.close()
            await ts.close()


async def main():
    failed = 0

    def report(name, err):
        nonlocal failed
        if err is None:
            print(f"ok {name}", flush=True)
        else:
            failed += 1
            why = " ".join(str(err).split()) or type(err).__name__
            print(f"fail {name}: {type(err).__name__}: {why}", flush=True)

    try:
        pub = await connect(PUB_URL, "mx-py-pub")
        sub = await connect(SUB_URL, "mx-py-sub")
    except Exception as e:
        for name in SCENARIOS:
            report(name, Exception(f"connect: {e!r}"))
        return 1

    m = Matrix(pub, sub)
    for name in SCENARIOS:
        start = time.monotonic()
        try:
            await asyncio.wait_for(getattr(m, name)(), SCENARIO_TIMEOUT)
            report(name, None)
        except asyncio.TimeoutError as e:
            log(traceback.format_exc())
            report(name, e if isinstance(e, nats.errors.Error) else Exception(f"ran past {SCENARIO_TIMEOUT} s"))
        except Exception as e:
            log(traceback.format_exc())
            report(name, e)
        log(f"{name}: {time.monotonic() - start:.2f} s")

    for nc in (pub, sub):
        try:
            await asyncio.wait_for(nc.close(), WAIT)
        except Exception as e:
            log("close:", repr(e))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
