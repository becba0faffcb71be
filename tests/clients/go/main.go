// The client matrix's scenarios for nats.go; see tests/clients/README.md.
package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
)

// Only payloads are sealed: names, header values and JetStream API requests cross the bus in
// the clear, so the marker appears in payloads and nowhere else.
const marker = "cbmx"

// The harness kills the program at 180 s; stop starting scenarios well before that.
const budget = 150 * time.Second

// Per scenario, so one stuck scenario cannot eat the whole budget.
const scenarioTimeout = 20 * time.Second

var (
	prefix, stream, bucket string
	pub, sub               *nats.Conn
	pubJS, subJS           nats.JetStreamContext
	start                  = time.Now()
)

func env(name string) string {
	v := os.Getenv(name)
	if v == "" {
		fmt.Fprintf(os.Stderr, "missing %s\n", name)
		os.Exit(2)
	}
	return v
}

func logf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "[%6.2fs] "+format+"\n", append([]interface{}{time.Since(start).Seconds()}, args...)...)
}

// payload returns n bytes; above 4 bytes it starts with the marker and a tag, then runs
// through every byte value so the proxy must carry binary data, CR and LF included.
func payload(n int, tag string) []byte {
	if n <= 4 {
		return []byte("abcd"[:n])
	}
	head := []byte(marker + ":" + tag + ":")
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i * 7)
	}
	// Truncated heads still start with the marker, since n > 4.
	copy(b, head)
	return b
}

func describe(b []byte) string {
	if len(b) <= 48 {
		return fmt.Sprintf("%q", b)
	}
	return fmt.Sprintf("%d bytes %q...", len(b), b[:48])
}

func sameBytes(what string, got, want []byte) error {
	if !bytes.Equal(got, want) {
		return fmt.Errorf("%s: got %s, want %s", what, describe(got), describe(want))
	}
	return nil
}

func subj(parts ...string) string {
	return prefix + "." + strings.Join(parts, ".")
}

// subscribeSync subscribes on the subscribing side and makes sure the server has the
// interest before anything is published.
func subscribeSync(s string) (*nats.Subscription, error) {
	ss, err := sub.SubscribeSync(s)
	if err != nil {
		return nil, err
	}
	if err := sub.FlushTimeout(5 * time.Second); err != nil {
		ss.Unsubscribe()
		return nil, fmt.Errorf("flush subscriber: %w", err)
	}
	return ss, nil
}

// expectNothingMore fails if the subscription holds or soon receives another message.
func expectNothingMore(ss *nats.Subscription) error {
	if err := pub.FlushTimeout(5 * time.Second); err != nil {
		return err
	}
	if m, err := ss.NextMsg(300 * time.Millisecond); err == nil {
		return fmt.Errorf("unexpected extra message %s", describe(m.Data))
	}
	return nil
}

func pubsubOnce(p, s *nats.Conn, name string, n int) error {
	subject := prefix + ".ps." + name
	ss, err := s.SubscribeSync(subject)
	if err != nil {
		return err
	}
	defer ss.Unsubscribe()
	if err := s.FlushTimeout(5 * time.Second); err != nil {
		return err
	}
	data := payload(n, name)
	if err := p.Publish(subject, data); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	if err := p.FlushTimeout(5 * time.Second); err != nil {
		return fmt.Errorf("flush publisher: %w", err)
	}
	m, err := ss.NextMsg(5 * time.Second)
	if err != nil {
		return fmt.Errorf("receive: %w", err)
	}
	if m.Subject != subject {
		return fmt.Errorf("subject %q, want %q", m.Subject, subject)
	}
	if len(m.Header) != 0 {
		return fmt.Errorf("unexpected headers %v", m.Header)
	}
	if err := sameBytes("payload", m.Data, data); err != nil {
		return err
	}
	if m2, err := ss.NextMsg(300 * time.Millisecond); err == nil {
		return fmt.Errorf("unexpected second message %s", describe(m2.Data))
	}
	return nil
}

func pubsub(n int) func() error {
	return func() error { return pubsubOnce(pub, sub, fmt.Sprintf("n%d", n), n) }
}

func pubsubMax() error {
	max := pub.MaxPayload()
	logf("publishing connection's max_payload: %d", max)
	if max <= 0 {
		return fmt.Errorf("max_payload %d", max)
	}
	return pubsubOnce(pub, sub, "max", int(max))
}

func order() error {
	const count = 1000
	ss, err := subscribeSync(subj("order"))
	if err != nil {
		return err
	}
	defer ss.Unsubscribe()
	for i := 0; i < count; i++ {
		if err := pub.Publish(subj("order"), []byte(fmt.Sprintf("cbmx-order-%04d", i))); err != nil {
			return fmt.Errorf("publish %d: %w", i, err)
		}
	}
	if err := pub.FlushTimeout(5 * time.Second); err != nil {
		return err
	}
	for i := 0; i < count; i++ {
		m, err := ss.NextMsg(5 * time.Second)
		if err != nil {
			return fmt.Errorf("after %d messages: %w", i, err)
		}
		if err := sameBytes(fmt.Sprintf("message %d", i), m.Data, []byte(fmt.Sprintf("cbmx-order-%04d", i))); err != nil {
			return err
		}
	}
	return expectNothingMore(ss)
}

func headersCase(name string, data []byte) error {
	subject := subj("hdr", name)
	ss, err := subscribeSync(subject)
	if err != nil {
		return err
	}
	defer ss.Unsubscribe()
	m := nats.NewMsg(subject)
	m.Header.Add("X-Mx-Multi", "first value")
	m.Header.Add("X-Mx-Multi", "second value")
	m.Header.Set("Nats-Msg-Id", "mx-hdr-"+name)
	m.Header.Set("X-Single", "v")
	m.Data = data
	want := nats.Header{}
	for k, v := range m.Header {
		want[k] = append([]string(nil), v...)
	}
	if err := pub.PublishMsg(m); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	if err := pub.FlushTimeout(5 * time.Second); err != nil {
		return err
	}
	got, err := ss.NextMsg(5 * time.Second)
	if err != nil {
		return fmt.Errorf("receive: %w", err)
	}
	if !reflect.DeepEqual(got.Header, want) {
		return fmt.Errorf("headers %v, want %v", got.Header, want)
	}
	if err := sameBytes("payload", got.Data, data); err != nil {
		return err
	}
	return expectNothingMore(ss)
}

func headersPayload() error { return headersCase("payload", payload(300, "headers")) }
func headersEmpty() error   { return headersCase("empty", nil) }

func requestReplyOn(p, s *nats.Conn, name string) error {
	subject := prefix + ".rr." + name
	got := make(chan []byte, 4)
	rs, err := s.Subscribe(subject, func(m *nats.Msg) {
		got <- append([]byte(nil), m.Data...)
		reply := append([]byte("cbmx-reply:"), m.Data...)
		if err := m.Respond(reply); err != nil {
			logf("respond: %v", err)
		}
	})
	if err != nil {
		return err
	}
	defer rs.Unsubscribe()
	if err := s.FlushTimeout(5 * time.Second); err != nil {
		return err
	}
	req := payload(200, "request-"+name)
	resp, err := p.Request(subject, req, 5*time.Second)
	if err != nil {
		return fmt.Errorf("request: %w", err)
	}
	select {
	case r := <-got:
		if err := sameBytes("request at the responder", r, req); err != nil {
			return err
		}
	default:
		return errors.New("a reply arrived but the responder saw no request")
	}
	return sameBytes("reply", resp.Data, append([]byte("cbmx-reply:"), req...))
}

func requestReply() error { return requestReplyOn(pub, sub, "plain") }

func noResponders() error {
	t0 := time.Now()
	// Outside the observed subject spaces: an observer's interest would stop the 503.
	_, err := pub.Request(env("CB_NOBODY"), payload(16, "noresp"), 5*time.Second)
	took := time.Since(t0)
	if !errors.Is(err, nats.ErrNoResponders) {
		return fmt.Errorf("got %v after %v, want nats.ErrNoResponders", err, took)
	}
	if took > 2*time.Second {
		return fmt.Errorf("no responders took %v", took)
	}
	return nil
}

func queueGroup() error {
	const count = 100
	subject := subj("queue")
	type hit struct {
		who  int
		data string
	}
	hits := make(chan hit, 4*count)
	for who := 0; who < 2; who++ {
		who := who
		qs, err := sub.QueueSubscribe(subject, "mxq", func(m *nats.Msg) {
			hits <- hit{who, string(m.Data)}
		})
		if err != nil {
			return err
		}
		defer qs.Unsubscribe()
	}
	if err := sub.FlushTimeout(5 * time.Second); err != nil {
		return err
	}
	for i := 0; i < count; i++ {
		if err := pub.Publish(subject, []byte(fmt.Sprintf("cbmx-queue-%03d", i))); err != nil {
			return err
		}
	}
	if err := pub.FlushTimeout(5 * time.Second); err != nil {
		return err
	}
	seen := map[string]int{}
	per := [2]int{}
	deadline := time.After(10 * time.Second)
	for len(seen) < count {
		select {
		case h := <-hits:
			seen[h.data]++
			per[h.who]++
			if seen[h.data] > 1 {
				return fmt.Errorf("%s delivered twice", h.data)
			}
		case <-deadline:
			return fmt.Errorf("only %d of %d messages delivered", len(seen), count)
		}
	}
	// Anything late is a duplicate.
	select {
	case h := <-hits:
		return fmt.Errorf("extra delivery %s", h.data)
	case <-time.After(300 * time.Millisecond):
	}
	for i := 0; i < count; i++ {
		if seen[fmt.Sprintf("cbmx-queue-%03d", i)] != 1 {
			return fmt.Errorf("message %d delivered %d times", i, seen[fmt.Sprintf("cbmx-queue-%03d", i)])
		}
	}
	logf("queue group split: %d / %d", per[0], per[1])
	return nil
}

// ensureStream creates CB_STREAM once, from the publishing side.
var streamReady error = errors.New("not yet created")

func ensureStream() error {
	if streamReady == nil {
		return nil
	}
	// A stream left over from an earlier run against the same server.
	_ = pubJS.DeleteStream(stream)
	_, err := pubJS.AddStream(&nats.StreamConfig{
		Name:     stream,
		Subjects: []string{prefix + ".js.>"},
		Storage:  nats.FileStorage,
	})
	if err != nil {
		return fmt.Errorf("add stream: %w", err)
	}
	streamReady = nil
	return nil
}

func lastSeq() (uint64, error) {
	info, err := pubJS.StreamInfo(stream)
	if err != nil {
		return 0, fmt.Errorf("stream info: %w", err)
	}
	return info.State.LastSeq, nil
}

func checkAck(ack *nats.PubAck, seq uint64, dup bool) error {
	if ack == nil {
		return errors.New("no ack")
	}
	if ack.Stream != stream {
		return fmt.Errorf("ack stream %q, want %q", ack.Stream, stream)
	}
	if ack.Sequence != seq {
		return fmt.Errorf("ack sequence %d, want %d", ack.Sequence, seq)
	}
	if ack.Duplicate != dup {
		return fmt.Errorf("ack duplicate %v, want %v", ack.Duplicate, dup)
	}
	return nil
}

func jsPublish() error {
	if err := ensureStream(); err != nil {
		return err
	}
	last, err := lastSeq()
	if err != nil {
		return err
	}
	ack, err := pubJS.Publish(subj("js", "plain"), payload(100, "js-plain"))
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	if err := checkAck(ack, last+1, false); err != nil {
		return err
	}
	now, err := lastSeq()
	if err != nil {
		return err
	}
	if now != last+1 {
		return fmt.Errorf("stream last sequence %d, want %d", now, last+1)
	}
	return nil
}

func jsPublishOptions() error {
	if err := ensureStream(); err != nil {
		return err
	}
	last, err := lastSeq()
	if err != nil {
		return err
	}
	ack, err := pubJS.Publish(subj("js", "opts"), payload(100, "js-opts"),
		nats.ExpectStream(stream), nats.ExpectLastSequence(last), nats.MsgId("mx-opts-1"))
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	if err := checkAck(ack, last+1, false); err != nil {
		return err
	}
	// The expectations must reach the server: a wrong one is refused.
	_, err = pubJS.Publish(subj("js", "opts"), payload(100, "js-opts-wrong"), nats.ExpectLastSequence(last))
	var apiErr *nats.APIError
	if !errors.As(err, &apiErr) || apiErr.ErrorCode != nats.JSErrCodeStreamWrongLastSequence {
		return fmt.Errorf("a wrong expected last sequence gave %v, want error code %d", err, nats.JSErrCodeStreamWrongLastSequence)
	}
	_, err = pubJS.Publish(subj("js", "opts"), payload(100, "js-opts-wrong"), nats.ExpectStream("NOT_"+stream))
	if err == nil {
		return errors.New("a wrong expected stream was accepted")
	}
	now, err := lastSeq()
	if err != nil {
		return err
	}
	if now != last+1 {
		return fmt.Errorf("stream last sequence %d, want %d", now, last+1)
	}
	return nil
}

func jsDedup() error {
	if err := ensureStream(); err != nil {
		return err
	}
	subject := subj("js", "dedup")
	last, err := lastSeq()
	if err != nil {
		return err
	}
	first, err := pubJS.Publish(subject, payload(80, "dedup-1"), nats.MsgId("mx-dedup"))
	if err != nil {
		return fmt.Errorf("first publish: %w", err)
	}
	if err := checkAck(first, last+1, false); err != nil {
		return fmt.Errorf("first: %w", err)
	}
	second, err := pubJS.Publish(subject, payload(80, "dedup-2"), nats.MsgId("mx-dedup"))
	if err != nil {
		return fmt.Errorf("second publish: %w", err)
	}
	if err := checkAck(second, last+1, true); err != nil {
		return fmt.Errorf("second: %w", err)
	}
	info, err := pubJS.StreamInfo(stream, &nats.StreamInfoRequest{SubjectsFilter: subject})
	if err != nil {
		return fmt.Errorf("stream info: %w", err)
	}
	if n := info.State.Subjects[subject]; n != 1 {
		return fmt.Errorf("stream holds %d copies on %s, want 1", n, subject)
	}
	if info.State.LastSeq != last+1 {
		return fmt.Errorf("stream last sequence %d, want %d", info.State.LastSeq, last+1)
	}
	return nil
}

func jsPullFetchAck() error {
	if err := ensureStream(); err != nil {
		return err
	}
	const count = 5
	subject := subj("js", "pull")
	var want [][]byte
	var seqs []uint64
	for i := 0; i < count; i++ {
		data := payload(64+i*100, fmt.Sprintf("pull-%d", i))
		ack, err := pubJS.Publish(subject, data)
		if err != nil {
			return fmt.Errorf("publish %d: %w", i, err)
		}
		want = append(want, data)
		seqs = append(seqs, ack.Sequence)
	}
	ps, err := subJS.PullSubscribe(subject, "mx_pull", nats.BindStream(stream))
	if err != nil {
		return fmt.Errorf("pull subscribe: %w", err)
	}
	defer ps.Unsubscribe()
	var got []*nats.Msg
	deadline := time.Now().Add(10 * time.Second)
	for len(got) < count && time.Now().Before(deadline) {
		msgs, err := ps.Fetch(count-len(got), nats.MaxWait(3*time.Second))
		if err != nil && !errors.Is(err, nats.ErrTimeout) {
			return fmt.Errorf("fetch: %w", err)
		}
		got = append(got, msgs...)
	}
	if len(got) != count {
		return fmt.Errorf("fetched %d of %d messages", len(got), count)
	}
	for i, m := range got {
		if err := sameBytes(fmt.Sprintf("message %d", i), m.Data, want[i]); err != nil {
			return err
		}
		md, err := m.Metadata()
		if err != nil {
			return fmt.Errorf("metadata %d: %w", i, err)
		}
		if md.Stream != stream || md.Consumer != "mx_pull" || md.Sequence.Stream != seqs[i] || md.Sequence.Consumer != uint64(i+1) {
			return fmt.Errorf("message %d metadata %+v, want stream seq %d consumer seq %d", i, *md, seqs[i], i+1)
		}
		if err := m.AckSync(nats.AckWait(5 * time.Second)); err != nil {
			return fmt.Errorf("ack %d: %w", i, err)
		}
	}
	ci, err := subJS.ConsumerInfo(stream, "mx_pull")
	if err != nil {
		return fmt.Errorf("consumer info: %w", err)
	}
	if ci.NumAckPending != 0 || ci.NumPending != 0 || ci.AckFloor.Stream != seqs[count-1] {
		return fmt.Errorf("after acks: ack pending %d, pending %d, ack floor %d (want 0, 0, %d)",
			ci.NumAckPending, ci.NumPending, ci.AckFloor.Stream, seqs[count-1])
	}
	return nil
}

var pubKV, subKV nats.KeyValue

// ensureBucket creates CB_BUCKET from the publishing side and binds it on the subscribing side.
func ensureBucket() error {
	if pubKV != nil && subKV != nil {
		return nil
	}
	if pubKV == nil {
		_ = pubJS.DeleteKeyValue(bucket)
		kv, err := pubJS.CreateKeyValue(&nats.KeyValueConfig{Bucket: bucket, History: 5})
		if err != nil {
			return fmt.Errorf("create bucket: %w", err)
		}
		pubKV = kv
	}
	kv, err := subJS.KeyValue(bucket)
	if err != nil {
		return fmt.Errorf("bind bucket on the subscribing side: %w", err)
	}
	subKV = kv
	return nil
}

func kvPutGet() error {
	if err := ensureBucket(); err != nil {
		return err
	}
	value := payload(500, "kv-value")
	rev, err := pubKV.Put("k1", value)
	if err != nil {
		return fmt.Errorf("put: %w", err)
	}
	e, err := subKV.Get("k1")
	if err != nil {
		return fmt.Errorf("get: %w", err)
	}
	if e.Key() != "k1" || e.Revision() != rev || e.Operation() != nats.KeyValuePut {
		return fmt.Errorf("entry key %q revision %d op %v, want k1 %d put", e.Key(), e.Revision(), e.Operation(), rev)
	}
	if err := sameBytes("value", e.Value(), value); err != nil {
		return err
	}
	// A second revision replaces the first.
	value2 := payload(40, "kv-value-2")
	rev2, err := pubKV.Put("k1", value2)
	if err != nil {
		return fmt.Errorf("second put: %w", err)
	}
	if rev2 <= rev {
		return fmt.Errorf("second revision %d after %d", rev2, rev)
	}
	e, err = subKV.Get("k1")
	if err != nil {
		return fmt.Errorf("second get: %w", err)
	}
	if e.Revision() != rev2 {
		return fmt.Errorf("second get revision %d, want %d", e.Revision(), rev2)
	}
	return sameBytes("second value", e.Value(), value2)
}

func kvDelete() error {
	if err := ensureBucket(); err != nil {
		return err
	}
	value := payload(60, "kv-doomed")
	rev, err := pubKV.Put("doomed", value)
	if err != nil {
		return fmt.Errorf("put: %w", err)
	}
	e, err := subKV.Get("doomed")
	if err != nil {
		return fmt.Errorf("get before delete: %w", err)
	}
	if e.Revision() != rev {
		return fmt.Errorf("get before delete: revision %d, want %d", e.Revision(), rev)
	}
	if err := sameBytes("value before delete", e.Value(), value); err != nil {
		return err
	}
	if err := pubKV.Delete("doomed"); err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	e, err = subKV.Get("doomed")
	if !errors.Is(err, nats.ErrKeyNotFound) {
		if err == nil {
			return fmt.Errorf("get after delete found revision %d %s", e.Revision(), describe(e.Value()))
		}
		return fmt.Errorf("get after delete: %v, want nats.ErrKeyNotFound", err)
	}
	return nil
}

func kvWatch() error {
	if err := ensureBucket(); err != nil {
		return err
	}
	w, err := subKV.Watch("watch.*")
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	defer w.Stop()
	// Nothing is stored under watch.* yet, so the first update is the end-of-initial marker.
	select {
	case e := <-w.Updates():
		if e != nil {
			return fmt.Errorf("initial update %s, want none", e.Key())
		}
	case <-time.After(5 * time.Second):
		return errors.New("no end-of-initial-values marker")
	}
	const count = 5
	type put struct {
		key   string
		value []byte
		rev   uint64
	}
	var puts []put
	for i := 0; i < count; i++ {
		key := fmt.Sprintf("watch.k%d", i%3)
		value := payload(30+i*50, fmt.Sprintf("watch-%d", i))
		rev, err := pubKV.Put(key, value)
		if err != nil {
			return fmt.Errorf("put %d: %w", i, err)
		}
		puts = append(puts, put{key, value, rev})
	}
	for i, p := range puts {
		select {
		case e := <-w.Updates():
			if e == nil {
				return fmt.Errorf("update %d: nil entry", i)
			}
			if e.Key() != p.key || e.Revision() != p.rev || e.Operation() != nats.KeyValuePut {
				return fmt.Errorf("update %d: key %q revision %d op %v, want %q %d put", i, e.Key(), e.Revision(), e.Operation(), p.key, p.rev)
			}
			if err := sameBytes(fmt.Sprintf("update %d", i), e.Value(), p.value); err != nil {
				return err
			}
		case <-time.After(5 * time.Second):
			return fmt.Errorf("only %d of %d updates", i, count)
		}
	}
	select {
	case e := <-w.Updates():
		if e != nil {
			return fmt.Errorf("extra update %s rev %d", e.Key(), e.Revision())
		}
	case <-time.After(300 * time.Millisecond):
	}
	return nil
}

func tlsScenario() error {
	ca := env("CB_CA")
	opts := func(name string) []nats.Option {
		return []nats.Option{nats.Name(name), nats.RootCAs(ca), nats.Timeout(5 * time.Second), nats.MaxReconnects(0)}
	}
	tp, err := nats.Connect(env("CB_TLS_PUB_URL"), opts("mx-go-tls-pub")...)
	if err != nil {
		return fmt.Errorf("connect publisher: %w", err)
	}
	defer tp.Close()
	ts, err := nats.Connect(env("CB_TLS_SUB_URL"), opts("mx-go-tls-sub")...)
	if err != nil {
		return fmt.Errorf("connect subscriber: %w", err)
	}
	defer ts.Close()
	if _, err := tp.TLSConnectionState(); err != nil {
		return fmt.Errorf("publisher not on TLS: %w", err)
	}
	if _, err := ts.TLSConnectionState(); err != nil {
		return fmt.Errorf("subscriber not on TLS: %w", err)
	}
	if err := pubsubOnce(tp, ts, "tls1k", 1024); err != nil {
		return fmt.Errorf("pubsub_1k: %w", err)
	}
	if err := requestReplyOn(tp, ts, "tls"); err != nil {
		return fmt.Errorf("request_reply: %w", err)
	}
	return nil
}

// run reports one scenario, turning a panic or a hang into a failure.
func run(name string, f func() error) bool {
	if time.Since(start) > budget {
		fmt.Printf("fail %s: not started, out of time\n", name)
		return false
	}
	done := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- fmt.Errorf("panic: %v", r)
			}
		}()
		done <- f()
	}()
	var err error
	t0 := time.Now()
	select {
	case err = <-done:
	case <-time.After(scenarioTimeout):
		err = fmt.Errorf("timed out after %v", scenarioTimeout)
	}
	logf("%s took %v", name, time.Since(t0).Round(time.Millisecond))
	if err != nil {
		fmt.Printf("fail %s: %s\n", name, strings.ReplaceAll(err.Error(), "\n", " "))
		return false
	}
	fmt.Printf("ok %s\n", name)
	return true
}

func connect(url, name string) *nats.Conn {
	nc, err := nats.Connect(url, nats.Name(name), nats.Timeout(5*time.Second), nats.MaxReconnects(0),
		nats.ErrorHandler(func(_ *nats.Conn, s *nats.Subscription, err error) {
			logf("%s: async error: %v", name, err)
		}))
	if err != nil {
		fmt.Fprintf(os.Stderr, "connect %s to %s: %v\n", name, url, err)
		return nil
	}
	return nc
}

func main() {
	prefix = env("CB_PREFIX")
	stream = env("CB_STREAM")
	bucket = env("CB_BUCKET")

	scenarios := []struct {
		name string
		f    func() error
	}{
		{"pubsub_0", pubsub(0)},
		{"pubsub_1", pubsub(1)},
		{"pubsub_1k", pubsub(1024)},
		{"pubsub_64k", pubsub(65536)},
		{"pubsub_max", pubsubMax},
		{"order", order},
		{"headers_payload", headersPayload},
		{"headers_empty", headersEmpty},
		{"request_reply", requestReply},
		{"no_responders", noResponders},
		{"queue_group", queueGroup},
		{"js_publish", jsPublish},
		{"js_publish_options", jsPublishOptions},
		{"js_dedup", jsDedup},
		{"js_pull_fetch_ack", jsPullFetchAck},
		{"kv_put_get", kvPutGet},
		{"kv_delete", kvDelete},
		{"kv_watch", kvWatch},
		{"tls", tlsScenario},
	}

	pub = connect(env("CB_PUB_URL"), "mx-go-pub")
	sub = connect(env("CB_SUB_URL"), "mx-go-sub")
	allOK := pub != nil && sub != nil
	if allOK {
		var err error
		if pubJS, err = pub.JetStream(nats.MaxWait(5 * time.Second)); err != nil {
			logf("jetstream on the publishing side: %v", err)
			allOK = false
		}
		if subJS, err = sub.JetStream(nats.MaxWait(5 * time.Second)); err != nil {
			logf("jetstream on the subscribing side: %v", err)
			allOK = false
		}
	}
	if !allOK {
		names := make([]string, 0, len(scenarios))
		for _, s := range scenarios {
			if s.name == "tls" {
				run(s.name, s.f)
				continue
			}
			names = append(names, s.name)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Printf("fail %s: could not connect\n", n)
		}
		os.Exit(1)
	}

	for _, s := range scenarios {
		if !run(s.name, s.f) {
			allOK = false
		}
	}
	pub.Close()
	sub.Close()
	if !allOK {
		os.Exit(1)
	}
}
