/*
 * The client matrix's scenarios for nats.c; see tests/clients/README.md.
 *
 * Every scenario fills `why` and returns false on failure, so the next one still runs.
 */
#include <nats/nats.h>

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How long any single wait may last, in milliseconds. */
#define WAIT 5000

static const char *pub_url, *sub_url, *tls_pub_url, *tls_sub_url, *ca_file;
static const char *prefix, *stream_name, *bucket;

static natsConnection *pub, *sub;
static jsCtx *js_pub, *js_sub;
static kvStore *kv_pub, *kv_sub;

static char why[1024];
static int failures;

static bool fail(const char *fmt, ...)
{
    /* Formatted aside first: callers may pass the previous reason as an argument. */
    char tmp[sizeof(why)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    memcpy(why, tmp, sizeof(why));
    return false;
}

static bool fail_status(const char *what, natsStatus s)
{
    const char *last = nats_GetLastError(NULL);
    return fail("%s: %s (%s)", what, natsStatus_GetText(s), last ? last : "");
}

static bool fail_js(const char *what, natsStatus s, jsErrCode jerr)
{
    const char *last = nats_GetLastError(NULL);
    return fail("%s: %s, js error %d (%s)", what, natsStatus_GetText(s), (int)jerr,
                last ? last : "");
}

static void report(const char *name, bool ok)
{
    if (ok) {
        printf("ok %s\n", name);
    } else {
        /* The report is one line per scenario. */
        for (char *p = why; *p; p++)
            if (*p == '\n' || *p == '\r')
                *p = ' ';
        printf("fail %s: %s\n", name, why);
        failures++;
    }
    fflush(stdout);
    why[0] = '\0';
}

static const char *env(const char *name)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') {
        fprintf(stderr, "missing environment variable %s\n", name);
        exit(2);
    }
    return v;
}

static void subject(char *buf, size_t len, const char *tail)
{
    snprintf(buf, len, "%s.%s", prefix, tail);
}

/* A payload of `len` bytes: the marker first when it fits, then bytes of every value. */
static char *payload(int len)
{
    char *p = malloc(len > 0 ? (size_t)len : 1);
    for (int i = 0; i < len; i++)
        p[i] = (char)((i * 31 + 7) & 0xff);
    if (len == 1)
        p[0] = 'x';
    if (len > 4)
        memcpy(p, "cbmx", 4);
    return p;
}

static void on_error(natsConnection *nc, natsSubscription *s, natsStatus err, void *closure)
{
    (void)nc;
    (void)s;
    fprintf(stderr, "async error on %s: %s\n", (const char *)closure, natsStatus_GetText(err));
}

static natsStatus cb_connect(natsConnection **nc, const char *url, const char *name, bool tls)
{
    natsOptions *o = NULL;
    natsStatus s = natsOptions_Create(&o);
    if (s == NATS_OK)
        s = natsOptions_SetURL(o, url);
    if (s == NATS_OK)
        s = natsOptions_SetName(o, name);
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(o, WAIT);
    if (s == NATS_OK)
        s = natsOptions_SetMaxReconnect(o, 0);
    if (s == NATS_OK)
        s = natsOptions_SetErrorHandler(o, on_error, (void *)name);
    if (s == NATS_OK && tls)
        s = natsOptions_SetSecure(o, true);
    if (s == NATS_OK && tls)
        s = natsOptions_LoadCATrustedCertificates(o, ca_file);
    if (s == NATS_OK)
        s = natsConnection_Connect(nc, o);
    natsOptions_Destroy(o);
    return s;
}

/* ---- core NATS ---- */

/* Publishes `len` bytes from `p` and checks the subscriber on `s` gets exactly them. */
static bool pubsub_on(natsConnection *p, natsConnection *s, const char *tail, int len)
{
    char subj[256];
    subject(subj, sizeof(subj), tail);
    natsSubscription *su = NULL;
    natsMsg *m = NULL;
    char *data = payload(len);
    bool ok = false;
    natsStatus st = natsConnection_SubscribeSync(&su, s, subj);
    if (st != NATS_OK) {
        fail_status("subscribe", st);
        goto out;
    }
    if ((st = natsConnection_FlushTimeout(s, WAIT)) != NATS_OK) {
        fail_status("flush subscriber", st);
        goto out;
    }
    if ((st = natsConnection_Publish(p, subj, data, len)) != NATS_OK) {
        fail_status("publish", st);
        goto out;
    }
    if ((st = natsConnection_FlushTimeout(p, WAIT)) != NATS_OK) {
        fail_status("flush publisher", st);
        goto out;
    }
    if ((st = natsSubscription_NextMsg(&m, su, WAIT)) != NATS_OK) {
        fail_status("receive", st);
        goto out;
    }
    int got = natsMsg_GetDataLength(m);
    if (got != len) {
        fail("got %d bytes, sent %d", got, len);
        goto out;
    }
    if (len > 0 && memcmp(natsMsg_GetData(m), data, (size_t)len) != 0) {
        fail("the %d bytes received differ from those sent", len);
        goto out;
    }
    if (strcmp(natsMsg_GetSubject(m), subj) != 0) {
        fail("arrived on %s, sent to %s", natsMsg_GetSubject(m), subj);
        goto out;
    }
    natsMsg_Destroy(m);
    m = NULL;
    /* Exactly one copy. */
    st = natsSubscription_NextMsg(&m, su, 200);
    if (st == NATS_OK) {
        fail("a second message arrived");
        goto out;
    }
    ok = true;
out:
    natsMsg_Destroy(m);
    natsSubscription_Destroy(su);
    free(data);
    return ok;
}

static bool pubsub(int len)
{
    char tail[64];
    snprintf(tail, sizeof(tail), "ps.%d", len);
    return pubsub_on(pub, sub, tail, len);
}

static bool pubsub_max(void)
{
    int64_t max = natsConnection_GetMaxPayload(pub);
    if (max <= 0)
        return fail("the publishing connection reports max_payload %lld", (long long)max);
    fprintf(stderr, "max_payload of the publishing connection: %lld\n", (long long)max);
    return pubsub_on(pub, sub, "ps.max", (int)max);
}

static bool order(void)
{
    enum { N = 1000 };
    char subj[256], buf[64];
    subject(subj, sizeof(subj), "order");
    natsSubscription *su = NULL;
    natsMsg *m = NULL;
    bool ok = false;
    natsStatus st = natsConnection_SubscribeSync(&su, sub, subj);
    if (st != NATS_OK) {
        fail_status("subscribe", st);
        goto out;
    }
    if ((st = natsConnection_FlushTimeout(sub, WAIT)) != NATS_OK) {
        fail_status("flush subscriber", st);
        goto out;
    }
    for (int i = 0; i < N; i++) {
        int n = snprintf(buf, sizeof(buf), "cbmx-order-%04d", i);
        if ((st = natsConnection_Publish(pub, subj, buf, n)) != NATS_OK) {
            fail_status("publish", st);
            goto out;
        }
    }
    if ((st = natsConnection_FlushTimeout(pub, WAIT)) != NATS_OK) {
        fail_status("flush publisher", st);
        goto out;
    }
    for (int i = 0; i < N; i++) {
        if ((st = natsSubscription_NextMsg(&m, su, WAIT)) != NATS_OK) {
            fail_status("receive", st);
            fail("after %d of %d messages: %s", i, N, why);
            goto out;
        }
        int n = snprintf(buf, sizeof(buf), "cbmx-order-%04d", i);
        if (natsMsg_GetDataLength(m) != n || memcmp(natsMsg_GetData(m), buf, (size_t)n) != 0) {
            fail("message %d is '%.*s', expected '%s'", i, natsMsg_GetDataLength(m),
                 natsMsg_GetData(m), buf);
            goto out;
        }
        natsMsg_Destroy(m);
        m = NULL;
    }
    if (natsSubscription_NextMsg(&m, su, 200) == NATS_OK) {
        fail("more than %d messages arrived", N);
        goto out;
    }
    ok = true;
out:
    natsMsg_Destroy(m);
    natsSubscription_Destroy(su);
    return ok;
}

/* Checks the headers sent by headers_scenario arrived exactly. */
static bool check_headers(natsMsg *m, const char *msg_id)
{
    const char **values = NULL;
    const char **keys = NULL;
    int count = 0;
    natsStatus st = natsMsgHeader_Values(m, "X-Cbmx-Multi", &values, &count);
    if (st != NATS_OK)
        return fail_status("header X-Cbmx-Multi", st);
    bool ok = count == 2 && strcmp(values[0], "first") == 0 && strcmp(values[1], "second") == 0;
    if (!ok)
        fail("X-Cbmx-Multi has %d values, first '%s'", count, count > 0 ? values[0] : "");
    free((void *)values);
    if (!ok)
        return false;
    const char *id = NULL;
    if ((st = natsMsgHeader_Get(m, "Nats-Msg-Id", &id)) != NATS_OK)
        return fail_status("header Nats-Msg-Id", st);
    if (strcmp(id, msg_id) != 0)
        return fail("Nats-Msg-Id is '%s', sent '%s'", id, msg_id);
    if ((st = natsMsgHeader_Keys(m, &keys, &count)) != NATS_OK)
        return fail_status("header keys", st);
    free((void *)keys);
    if (count != 2)
        return fail("%d header names arrived, sent 2", count);
    return true;
}

static bool headers_scenario(const char *tail, const char *data, const char *msg_id)
{
    char subj[256];
    subject(subj, sizeof(subj), tail);
    int len = (int)strlen(data);
    natsSubscription *su = NULL;
    natsMsg *out_msg = NULL, *m = NULL;
    bool ok = false;
    natsStatus st = natsConnection_SubscribeSync(&su, sub, subj);
    if (st == NATS_OK)
        st = natsConnection_FlushTimeout(sub, WAIT);
    if (st != NATS_OK) {
        fail_status("subscribe", st);
        goto out;
    }
    st = natsMsg_Create(&out_msg, subj, NULL, data, len);
    if (st == NATS_OK)
        st = natsMsgHeader_Add(out_msg, "X-Cbmx-Multi", "first");
    if (st == NATS_OK)
        st = natsMsgHeader_Add(out_msg, "X-Cbmx-Multi", "second");
    if (st == NATS_OK)
        st = natsMsgHeader_Set(out_msg, "Nats-Msg-Id", msg_id);
    if (st != NATS_OK) {
        fail_status("build the message", st);
        goto out;
    }
    if ((st = natsConnection_PublishMsg(pub, out_msg)) != NATS_OK ||
        (st = natsConnection_FlushTimeout(pub, WAIT)) != NATS_OK) {
        fail_status("publish", st);
        goto out;
    }
    if ((st = natsSubscription_NextMsg(&m, su, WAIT)) != NATS_OK) {
        fail_status("receive", st);
        goto out;
    }
    if (!check_headers(m, msg_id))
        goto out;
    if (natsMsg_GetDataLength(m) != len ||
        memcmp(natsMsg_GetData(m), data, (size_t)len) != 0) {
        fail("payload is %d bytes '%.*s', sent %d bytes '%s'", natsMsg_GetDataLength(m),
             natsMsg_GetDataLength(m), natsMsg_GetData(m), len, data);
        goto out;
    }
    ok = true;
out:
    natsMsg_Destroy(m);
    natsMsg_Destroy(out_msg);
    natsSubscription_Destroy(su);
    return ok;
}

static void responder(natsConnection *nc, natsSubscription *s, natsMsg *m, void *closure)
{
    (void)s;
    (void)closure;
    char buf[512];
    int n = snprintf(buf, sizeof(buf), "cbmx-reply:%.*s", natsMsg_GetDataLength(m),
                     natsMsg_GetData(m));
    if (natsMsg_GetReply(m) != NULL)
        natsConnection_Publish(nc, natsMsg_GetReply(m), buf, n);
    natsMsg_Destroy(m);
}

static bool request_reply_on(natsConnection *p, natsConnection *s, const char *tail)
{
    char subj[256];
    subject(subj, sizeof(subj), tail);
    const char *req = "cbmx-request-42";
    const char *want = "cbmx-reply:cbmx-request-42";
    natsSubscription *su = NULL;
    natsMsg *reply = NULL;
    bool ok = false;
    natsStatus st = natsConnection_Subscribe(&su, s, subj, responder, NULL);
    if (st == NATS_OK)
        st = natsConnection_FlushTimeout(s, WAIT);
    if (st != NATS_OK) {
        fail_status("subscribe the responder", st);
        goto out;
    }
    if ((st = natsConnection_RequestString(&reply, p, subj, req, WAIT)) != NATS_OK) {
        fail_status("request", st);
        goto out;
    }
    if (natsMsg_GetDataLength(reply) != (int)strlen(want) ||
        memcmp(natsMsg_GetData(reply), want, strlen(want)) != 0) {
        fail("reply is '%.*s', expected '%s'", natsMsg_GetDataLength(reply),
             natsMsg_GetData(reply), want);
        goto out;
    }
    ok = true;
out:
    natsMsg_Destroy(reply);
    natsSubscription_Destroy(su);
    return ok;
}

static bool no_responders(void)
{
    /* Outside the observed subject spaces: an observer's interest would stop the 503. */
    const char *subj = env("CB_NOBODY");
    natsMsg *reply = NULL;
    int64_t start = nats_Now();
    natsStatus st = natsConnection_RequestString(&reply, pub, subj, "cbmx-anyone", 2000);
    int64_t took = nats_Now() - start;
    natsMsg_Destroy(reply);
    if (st != NATS_NO_RESPONDERS)
        return fail("request returned %s after %lld ms, expected no responders",
                    natsStatus_GetText(st), (long long)took);
    if (took >= 2000)
        return fail("no responders took %lld ms", (long long)took);
    return true;
}

static bool queue_group(void)
{
    enum { N = 100 };
    char subj[256], buf[64];
    subject(subj, sizeof(subj), "queue");
    natsSubscription *q[2] = {NULL, NULL};
    natsMsg *m = NULL;
    int seen[N] = {0};
    int per[2] = {0, 0};
    bool ok = false;
    natsStatus st = natsConnection_QueueSubscribeSync(&q[0], sub, subj, "mxc_workers");
    if (st == NATS_OK)
        st = natsConnection_QueueSubscribeSync(&q[1], sub, subj, "mxc_workers");
    if (st == NATS_OK)
        st = natsConnection_FlushTimeout(sub, WAIT);
    if (st != NATS_OK) {
        fail_status("queue subscribe", st);
        goto out;
    }
    for (int i = 0; i < N; i++) {
        int n = snprintf(buf, sizeof(buf), "cbmx-queue-%03d", i);
        if ((st = natsConnection_Publish(pub, subj, buf, n)) != NATS_OK) {
            fail_status("publish", st);
            goto out;
        }
    }
    if ((st = natsConnection_FlushTimeout(pub, WAIT)) != NATS_OK) {
        fail_status("flush publisher", st);
        goto out;
    }
    int total = 0;
    int64_t deadline = nats_Now() + WAIT;
    /* Poll both members until all arrived, then a little longer to catch duplicates. */
    int64_t quiet_until = 0;
    for (;;) {
        bool any = false;
        for (int k = 0; k < 2; k++) {
            while (natsSubscription_NextMsg(&m, q[k], 20) == NATS_OK) {
                any = true;
                int idx = -1;
                const char *d = natsMsg_GetData(m);
                int dl = natsMsg_GetDataLength(m);
                if (dl == 14 && memcmp(d, "cbmx-queue-", 11) == 0)
                    idx = atoi(d + 11);
                if (idx < 0 || idx >= N) {
                    fail("unexpected payload '%.*s'", dl, d);
                    goto out;
                }
                if (seen[idx]++) {
                    fail("message %d delivered twice", idx);
                    goto out;
                }
                per[k]++;
                total++;
                natsMsg_Destroy(m);
                m = NULL;
            }
        }
        int64_t now = nats_Now();
        if (total == N && quiet_until == 0)
            quiet_until = now + 300;
        if (quiet_until != 0 && now >= quiet_until && !any)
            break;
        if (total < N && now >= deadline) {
            fail("received %d of %d messages", total, N);
            goto out;
        }
    }
    fprintf(stderr, "queue_group: %d and %d\n", per[0], per[1]);
    ok = true;
out:
    natsMsg_Destroy(m);
    natsSubscription_Destroy(q[0]);
    natsSubscription_Destroy(q[1]);
    return ok;
}

/* ---- JetStream ---- */

static bool stream_ready;

static bool make_stream(void)
{
    char subj[256];
    subject(subj, sizeof(subj), "js.>");
    const char *subjects[] = {subj};
    jsStreamConfig cfg;
    jsErrCode jerr = 0;
    jsStreamInfo *si = NULL;
    /* A stream left by an earlier run on the same server would skew the sequences. */
    js_DeleteStream(js_pub, stream_name, NULL, NULL);
    jsStreamConfig_Init(&cfg);
    cfg.Name = stream_name;
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_FileStorage;
    natsStatus st = js_AddStream(&si, js_pub, &cfg, NULL, &jerr);
    if (st != NATS_OK)
        return fail_js("create the stream", st, jerr);
    jsStreamInfo_Destroy(si);
    stream_ready = true;
    return true;
}

static bool stream_state(jsStreamState *state)
{
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus st = js_GetStreamInfo(&si, js_pub, stream_name, NULL, &jerr);
    if (st != NATS_OK)
        return fail_js("stream info", st, jerr);
    *state = si->State;
    state->Subjects = NULL;
    state->Deleted = NULL;
    state->Lost = NULL;
    jsStreamInfo_Destroy(si);
    return true;
}

static bool check_ack(jsPubAck *pa, uint64_t seq, bool dup)
{
    if (pa == NULL)
        return fail("no ack");
    if (pa->Stream == NULL || strcmp(pa->Stream, stream_name) != 0)
        return fail("ack names stream '%s', expected '%s'", pa->Stream ? pa->Stream : "",
                    stream_name);
    if (pa->Sequence != seq)
        return fail("ack has sequence %llu, expected %llu", (unsigned long long)pa->Sequence,
                    (unsigned long long)seq);
    if (pa->Duplicate != dup)
        return fail("ack says duplicate=%d, expected %d", pa->Duplicate, dup);
    return true;
}

static bool js_publish(void)
{
    if (!stream_ready && !make_stream())
        return false;
    char subj[256];
    subject(subj, sizeof(subj), "js.plain");
    jsStreamState before;
    if (!stream_state(&before))
        return false;
    jsPubAck *pa = NULL;
    jsErrCode jerr = 0;
    const char *data = "cbmx-js-plain";
    natsStatus st = js_Publish(&pa, js_pub, subj, data, (int)strlen(data), NULL, &jerr);
    if (st != NATS_OK)
        return fail_js("publish", st, jerr);
    bool ok = check_ack(pa, before.LastSeq + 1, false);
    jsPubAck_Destroy(pa);
    return ok;
}

static bool js_publish_options(void)
{
    if (!stream_ready && !make_stream())
        return false;
    char subj[256];
    subject(subj, sizeof(subj), "js.options");
    jsStreamState before;
    if (!stream_state(&before))
        return false;
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.ExpectStream = stream_name;
    po.ExpectLastSeq = before.LastSeq;
    po.MsgId = "mxc-options-1";
    po.MaxWait = WAIT;
    jsPubAck *pa = NULL;
    jsErrCode jerr = 0;
    const char *data = "cbmx-js-options";
    natsStatus st = js_Publish(&pa, js_pub, subj, data, (int)strlen(data), &po, &jerr);
    if (st != NATS_OK)
        return fail_js("publish with options", st, jerr);
    bool ok = check_ack(pa, before.LastSeq + 1, false);
    jsPubAck_Destroy(pa);
    pa = NULL;
    if (!ok)
        return false;
    /* The expectation must reach the server: a stale last sequence is refused. */
    jsPubOptions_Init(&po);
    po.ExpectStream = stream_name;
    po.ExpectLastSeq = before.LastSeq;
    po.MaxWait = WAIT;
    jerr = 0;
    st = js_Publish(&pa, js_pub, subj, data, (int)strlen(data), &po, &jerr);
    jsPubAck_Destroy(pa);
    if (st == NATS_OK)
        return fail("a publish expecting a stale last sequence was accepted");
    if (jerr != JSStreamWrongLastSequenceErr)
        return fail_js("stale last sequence refused with the wrong error", st, jerr);
    /* And the wrong stream name too. */
    jsPubOptions_Init(&po);
    po.ExpectStream = "CBMX_NOT_THIS_STREAM";
    po.MaxWait = WAIT;
    jerr = 0;
    pa = NULL;
    st = js_Publish(&pa, js_pub, subj, data, (int)strlen(data), &po, &jerr);
    jsPubAck_Destroy(pa);
    if (st == NATS_OK)
        return fail("a publish expecting another stream was accepted");
    if (jerr != JSStreamNotMatchErr)
        return fail_js("wrong expected stream refused with the wrong error", st, jerr);
    return true;
}

static bool js_dedup(void)
{
    if (!stream_ready && !make_stream())
        return false;
    char subj[256];
    subject(subj, sizeof(subj), "js.dedup");
    jsStreamState before, after;
    if (!stream_state(&before))
        return false;
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = "mxc-dedup-1";
    po.MaxWait = WAIT;
    jsPubAck *a1 = NULL, *a2 = NULL;
    jsErrCode jerr = 0;
    const char *data = "cbmx-js-dedup";
    bool ok = false;
    natsStatus st = js_Publish(&a1, js_pub, subj, data, (int)strlen(data), &po, &jerr);
    if (st != NATS_OK) {
        fail_js("first publish", st, jerr);
        goto out;
    }
    if (!check_ack(a1, before.LastSeq + 1, false))
        goto out;
    st = js_Publish(&a2, js_pub, subj, data, (int)strlen(data), &po, &jerr);
    if (st != NATS_OK) {
        fail_js("second publish", st, jerr);
        goto out;
    }
    if (!check_ack(a2, a1->Sequence, true)) {
        fail("second ack: %s", why);
        goto out;
    }
    if (!stream_state(&after))
        goto out;
    if (after.Msgs != before.Msgs + 1 || after.LastSeq != before.LastSeq + 1) {
        fail("the stream went from %llu to %llu messages (last seq %llu to %llu), expected one more",
             (unsigned long long)before.Msgs, (unsigned long long)after.Msgs,
             (unsigned long long)before.LastSeq, (unsigned long long)after.LastSeq);
        goto out;
    }
    ok = true;
out:
    jsPubAck_Destroy(a1);
    jsPubAck_Destroy(a2);
    return ok;
}

static bool js_pull_fetch_ack(void)
{
    enum { N = 5 };
    if (!stream_ready && !make_stream())
        return false;
    char subj[256], filter[256], buf[64];
    subject(filter, sizeof(filter), "js.pull.>");
    natsSubscription *su = NULL;
    natsMsgList list = {NULL, 0};
    jsConsumerInfo *ci = NULL;
    jsErrCode jerr = 0;
    uint64_t seqs[N];
    bool ok = false;
    natsStatus st;
    for (int i = 0; i < N; i++) {
        jsPubAck *pa = NULL;
        snprintf(subj, sizeof(subj), "%s.js.pull.%d", prefix, i);
        int n = snprintf(buf, sizeof(buf), "cbmx-pull-%d", i);
        if ((st = js_Publish(&pa, js_pub, subj, buf, n, NULL, &jerr)) != NATS_OK) {
            fail_js("publish", st, jerr);
            goto out;
        }
        seqs[i] = pa->Sequence;
        jsPubAck_Destroy(pa);
    }
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = stream_name;
    so.Config.AckPolicy = js_AckExplicit;
    so.Config.DeliverPolicy = js_DeliverAll;
    st = js_PullSubscribe(&su, js_sub, filter, "mxc_pull", NULL, &so, &jerr);
    if (st != NATS_OK) {
        fail_js("pull subscribe", st, jerr);
        goto out;
    }
    int got = 0;
    int64_t deadline = nats_Now() + WAIT * 2;
    while (got < N) {
        if (nats_Now() >= deadline) {
            fail("fetched %d of %d messages", got, N);
            goto out;
        }
        st = natsSubscription_Fetch(&list, su, N - got, WAIT, &jerr);
        if (st == NATS_TIMEOUT)
            continue;
        if (st != NATS_OK) {
            fail_js("fetch", st, jerr);
            goto out;
        }
        for (int k = 0; k < list.Count; k++, got++) {
            natsMsg *m = list.Msgs[k];
            if (got >= N) {
                fail("fetched more than %d messages", N);
                goto out;
            }
            int n = snprintf(buf, sizeof(buf), "cbmx-pull-%d", got);
            snprintf(subj, sizeof(subj), "%s.js.pull.%d", prefix, got);
            if (natsMsg_GetDataLength(m) != n || memcmp(natsMsg_GetData(m), buf, (size_t)n) != 0) {
                fail("message %d is '%.*s', expected '%s'", got, natsMsg_GetDataLength(m),
                     natsMsg_GetData(m), buf);
                goto out;
            }
            if (strcmp(natsMsg_GetSubject(m), subj) != 0) {
                fail("message %d has subject %s, expected %s", got, natsMsg_GetSubject(m), subj);
                goto out;
            }
            jsMsgMetaData *meta = NULL;
            if ((st = natsMsg_GetMetaData(&meta, m)) != NATS_OK) {
                fail_status("message metadata", st);
                goto out;
            }
            bool meta_ok = meta->Sequence.Stream == seqs[got] &&
                           meta->Sequence.Consumer == (uint64_t)got + 1 &&
                           strcmp(meta->Stream, stream_name) == 0 && meta->NumDelivered == 1;
            if (!meta_ok)
                fail("message %d metadata: stream %s seq %llu (expected %llu), consumer seq %llu, delivered %llu",
                     got, meta->Stream, (unsigned long long)meta->Sequence.Stream,
                     (unsigned long long)seqs[got], (unsigned long long)meta->Sequence.Consumer,
                     (unsigned long long)meta->NumDelivered);
            jsMsgMetaData_Destroy(meta);
            if (!meta_ok)
                goto out;
            if ((st = natsMsg_AckSync(m, NULL, &jerr)) != NATS_OK) {
                fail_js("ack", st, jerr);
                goto out;
            }
        }
        natsMsgList_Destroy(&list);
    }
    st = js_GetConsumerInfo(&ci, js_sub, stream_name, "mxc_pull", NULL, &jerr);
    if (st != NATS_OK) {
        fail_js("consumer info", st, jerr);
        goto out;
    }
    if (ci->NumAckPending != 0 || ci->AckFloor.Consumer != N || ci->NumPending != 0 ||
        ci->AckFloor.Stream != seqs[N - 1]) {
        fail("after the acks: %lld pending acks, ack floor %llu/%llu, %llu pending",
             (long long)ci->NumAckPending, (unsigned long long)ci->AckFloor.Consumer,
             (unsigned long long)ci->AckFloor.Stream, (unsigned long long)ci->NumPending);
        goto out;
    }
    ok = true;
out:
    natsMsgList_Destroy(&list);
    jsConsumerInfo_Destroy(ci);
    if (su != NULL)
        natsSubscription_Unsubscribe(su);
    natsSubscription_Destroy(su);
    return ok;
}

/* ---- KV ---- */

static bool make_bucket(void)
{
    if (kv_pub != NULL)
        return true;
    kvConfig cfg;
    js_DeleteKeyValue(js_pub, bucket);
    kvConfig_Init(&cfg);
    cfg.Bucket = bucket;
    cfg.History = 5;
    natsStatus st = js_CreateKeyValue(&kv_pub, js_pub, &cfg);
    if (st != NATS_OK)
        return fail_status("create the bucket", st);
    if ((st = js_KeyValue(&kv_sub, js_sub, bucket)) != NATS_OK) {
        kvStore_Destroy(kv_pub);
        kv_pub = NULL;
        return fail_status("open the bucket on the subscribing side", st);
    }
    return true;
}

static bool check_entry(kvEntry *e, const char *key, const char *value, uint64_t rev, kvOperation op)
{
    int len = (int)strlen(value);
    if (strcmp(kvEntry_Key(e), key) != 0)
        return fail("entry for key '%s', expected '%s'", kvEntry_Key(e), key);
    if (kvEntry_ValueLen(e) != len || memcmp(kvEntry_Value(e), value, (size_t)len) != 0)
        return fail("value of %s is '%.*s', expected '%s'", key, kvEntry_ValueLen(e),
                    (const char *)kvEntry_Value(e), value);
    if (kvEntry_Revision(e) != rev)
        return fail("revision of %s is %llu, expected %llu", key,
                    (unsigned long long)kvEntry_Revision(e), (unsigned long long)rev);
    if (kvEntry_Operation(e) != op)
        return fail("operation of %s is %d, expected %d", key, kvEntry_Operation(e), op);
    return true;
}

static bool kv_put_get(void)
{
    if (!make_bucket())
        return false;
    const char *value = "cbmx-kv-value-1";
    uint64_t rev = 0;
    kvEntry *e = NULL;
    natsStatus st = kvStore_PutString(&rev, kv_pub, "k1", value);
    if (st != NATS_OK)
        return fail_status("put", st);
    if ((st = kvStore_Get(&e, kv_sub, "k1")) != NATS_OK)
        return fail_status("get", st);
    bool ok = check_entry(e, "k1", value, rev, kvOp_Put);
    kvEntry_Destroy(e);
    if (!ok)
        return false;
    /* A second revision replaces the first. */
    const char *value2 = "cbmx-kv-value-2";
    uint64_t rev2 = 0;
    if ((st = kvStore_PutString(&rev2, kv_pub, "k1", value2)) != NATS_OK)
        return fail_status("second put", st);
    if (rev2 <= rev)
        return fail("second put has revision %llu after %llu", (unsigned long long)rev2,
                    (unsigned long long)rev);
    if ((st = kvStore_Get(&e, kv_sub, "k1")) != NATS_OK)
        return fail_status("second get", st);
    ok = check_entry(e, "k1", value2, rev2, kvOp_Put);
    kvEntry_Destroy(e);
    return ok;
}

static bool kv_delete(void)
{
    if (!make_bucket())
        return false;
    uint64_t rev = 0;
    kvEntry *e = NULL;
    natsStatus st = kvStore_PutString(&rev, kv_pub, "gone", "cbmx-doomed");
    if (st != NATS_OK)
        return fail_status("put", st);
    if ((st = kvStore_Get(&e, kv_sub, "gone")) != NATS_OK)
        return fail_status("get before the delete", st);
    bool ok = check_entry(e, "gone", "cbmx-doomed", rev, kvOp_Put);
    kvEntry_Destroy(e);
    e = NULL;
    if (!ok)
        return false;
    if ((st = kvStore_Delete(kv_pub, "gone")) != NATS_OK)
        return fail_status("delete", st);
    st = kvStore_Get(&e, kv_sub, "gone");
    kvEntry_Destroy(e);
    if (st != NATS_NOT_FOUND)
        return fail("get after the delete returned %s, expected not found", natsStatus_GetText(st));
    return true;
}

static bool kv_watch(void)
{
    enum { N = 5 };
    if (!make_bucket())
        return false;
    kvWatcher *w = NULL;
    kvEntry *e = NULL;
    bool ok = false;
    char key[64], value[64];
    natsStatus st = kvStore_Watch(&w, kv_sub, "watch.*", NULL);
    if (st != NATS_OK)
        return fail_status("watch", st);
    /* Nothing under watch.* yet: the first entry is the end of the initial values. */
    if ((st = kvWatcher_Next(&e, w, WAIT)) != NATS_OK) {
        fail_status("initial values", st);
        goto out;
    }
    if (e != NULL) {
        fail("an initial value for '%s' on a fresh key space", kvEntry_Key(e));
        goto out;
    }
    uint64_t revs[N];
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof(key), "watch.%d", i % 2);
        snprintf(value, sizeof(value), "cbmx-watch-%d", i);
        if ((st = kvStore_PutString(&revs[i], kv_pub, key, value)) != NATS_OK) {
            fail_status("put", st);
            goto out;
        }
    }
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof(key), "watch.%d", i % 2);
        snprintf(value, sizeof(value), "cbmx-watch-%d", i);
        if ((st = kvWatcher_Next(&e, w, WAIT)) != NATS_OK) {
            fail_status("next", st);
            fail("update %d: %s", i, why);
            goto out;
        }
        if (e == NULL) {
            fail("update %d is empty", i);
            goto out;
        }
        if (!check_entry(e, key, value, revs[i], kvOp_Put)) {
            fail("update %d: %s", i, why);
            goto out;
        }
        kvEntry_Destroy(e);
        e = NULL;
    }
    if (kvWatcher_Next(&e, w, 300) == NATS_OK && e != NULL) {
        fail("an extra update for '%s'", kvEntry_Key(e));
        goto out;
    }
    ok = true;
out:
    kvEntry_Destroy(e);
    kvWatcher_Stop(w);
    kvWatcher_Destroy(w);
    return ok;
}

/* ---- TLS ---- */

static bool tls(void)
{
    natsConnection *tp = NULL, *ts = NULL;
    bool ok = false;
    natsStatus st = cb_connect(&tp, tls_pub_url, "mxc-tls-pub", true);
    if (st != NATS_OK) {
        fail_status("connect the TLS publisher", st);
        goto out;
    }
    if ((st = cb_connect(&ts, tls_sub_url, "mxc-tls-sub", true)) != NATS_OK) {
        fail_status("connect the TLS subscriber", st);
        goto out;
    }
    if (!pubsub_on(tp, ts, "tls.ps", 1024)) {
        fail("pubsub_1k: %s", why);
        goto out;
    }
    if (!request_reply_on(tp, ts, "tls.rr")) {
        fail("request_reply: %s", why);
        goto out;
    }
    ok = true;
out:
    natsConnection_Destroy(tp);
    natsConnection_Destroy(ts);
    return ok;
}

int main(void)
{
    pub_url = env("CB_PUB_URL");
    sub_url = env("CB_SUB_URL");
    tls_pub_url = env("CB_TLS_PUB_URL");
    tls_sub_url = env("CB_TLS_SUB_URL");
    ca_file = env("CB_CA");
    prefix = env("CB_PREFIX");
    stream_name = env("CB_STREAM");
    bucket = env("CB_BUCKET");

    fprintf(stderr, "nats.c %s\n", nats_GetVersion());
    natsStatus st = cb_connect(&pub, pub_url, "mxc-pub", false);
    if (st == NATS_OK)
        st = cb_connect(&sub, sub_url, "mxc-sub", false);
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = WAIT;
    if (st == NATS_OK)
        st = natsConnection_JetStream(&js_pub, pub, &jo);
    if (st == NATS_OK)
        st = natsConnection_JetStream(&js_sub, sub, &jo);
    if (st != NATS_OK) {
        fail_status("connect", st);
        fprintf(stderr, "%s\n", why);
        printf("fail connect: %s\n", why);
        fflush(stdout);
        return 1;
    }

    report("pubsub_0", pubsub(0));
    report("pubsub_1", pubsub(1));
    report("pubsub_1k", pubsub(1024));
    report("pubsub_64k", pubsub(65536));
    report("pubsub_max", pubsub_max());
    report("order", order());
    report("headers_payload", headers_scenario("hdr.payload", "cbmx-with-headers", "mxc-hdr-1"));
    report("headers_empty", headers_scenario("hdr.empty", "", "mxc-hdr-2"));
    report("request_reply", request_reply_on(pub, sub, "rr"));
    report("no_responders", no_responders());
    report("queue_group", queue_group());
    report("js_publish", js_publish());
    report("js_publish_options", js_publish_options());
    report("js_dedup", js_dedup());
    report("js_pull_fetch_ack", js_pull_fetch_ack());
    report("kv_put_get", kv_put_get());
    report("kv_delete", kv_delete());
    report("kv_watch", kv_watch());
    report("tls", tls());

    kvStore_Destroy(kv_pub);
    kvStore_Destroy(kv_sub);
    jsCtx_Destroy(js_pub);
    jsCtx_Destroy(js_sub);
    natsConnection_Destroy(pub);
    natsConnection_Destroy(sub);
    nats_CloseAndWait(2000);
    return failures == 0 ? 0 : 1;
}
