package agent

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func openTestQueue(tb testing.TB, dir string, opts QueueOptions) *queue {
	tb.Helper()
	q, err := openQueue(dir, opts)
	if err != nil {
		tb.Fatalf("openQueue: %v", err)
	}
	tb.Cleanup(func() { _ = q.Close() })
	return q
}

func appendN(tb testing.TB, q *queue, from, n int) {
	tb.Helper()
	for i := from; i < from+n; i++ {
		if err := q.Append("telemetry", []byte(fmt.Sprintf("msg-%05d", i))); err != nil {
			tb.Fatalf("Append %d: %v", i, err)
		}
	}
}

// payloads peeks everything pending.
func payloads(tb testing.TB, q *queue) []string {
	tb.Helper()
	recs, err := q.Peek(1 << 30)
	if err != nil {
		tb.Fatalf("Peek: %v", err)
	}
	out := make([]string, len(recs))
	for i, r := range recs {
		if r.Topic != "telemetry" {
			tb.Fatalf("record %d topic %q", i, r.Topic)
		}
		out[i] = string(r.Payload)
	}
	return out
}

func wantRange(tb testing.TB, got []string, from, to int) {
	tb.Helper()
	if len(got) != to-from {
		tb.Fatalf("got %d records, want %d (msg-%05d..msg-%05d); first %v", len(got), to-from, from, to-1, got[:min(3, len(got))])
	}
	for i, p := range got {
		if want := fmt.Sprintf("msg-%05d", from+i); p != want {
			tb.Fatalf("record %d = %q, want %q", i, p, want)
		}
	}
}

func TestQueueOrderAndAck(t *testing.T) {
	q := openTestQueue(t, t.TempDir(), QueueOptions{})
	appendN(t, q, 0, 10)
	recs, err := q.Peek(4)
	if err != nil || len(recs) != 4 {
		t.Fatalf("Peek(4) = %d records, %v", len(recs), err)
	}
	for i := 1; i < len(recs); i++ {
		if recs[i].Seq != recs[i-1].Seq+1 {
			t.Fatalf("seqs not consecutive: %d then %d", recs[i-1].Seq, recs[i].Seq)
		}
	}
	// Peek does not remove.
	wantRange(t, payloads(t, q), 0, 10)
	if err := q.Ack(recs[2].Seq); err != nil {
		t.Fatal(err)
	}
	wantRange(t, payloads(t, q), 3, 10)
	// Acking an older seq again changes nothing.
	if err := q.Ack(recs[0].Seq); err != nil {
		t.Fatal(err)
	}
	wantRange(t, payloads(t, q), 3, 10)
	if p, _, d := q.Stats(); p != 7 || d != 0 {
		t.Errorf("Stats = %d pending %d dropped, want 7, 0", p, d)
	}
}

func TestQueueCapByCountDropsOldest(t *testing.T) {
	dir := t.TempDir()
	q := openTestQueue(t, dir, QueueOptions{MaxMessages: 5})
	appendN(t, q, 0, 12)
	wantRange(t, payloads(t, q), 7, 12)
	if p, _, d := q.Stats(); p != 5 || d != 7 {
		t.Errorf("Stats = %d pending %d dropped, want 5, 7", p, d)
	}
	// The drop count survives a restart.
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = openTestQueue(t, dir, QueueOptions{MaxMessages: 5})
	if _, _, d := q.Stats(); d != 7 {
		t.Errorf("dropped after reopen = %d, want 7", d)
	}
	wantRange(t, payloads(t, q), 7, 12)
}

// A queue full for weeks drops a message at every sample; the log says so
// once an hour, not every time (the journal may be on the SD card).
func TestQueueDropsLoggedOnceAnHour(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var logs bytes.Buffer
	q := openTestQueue(t, t.TempDir(), QueueOptions{MaxMessages: 2, Logger: zerolog.New(&logs), Now: func() time.Time { return now }})
	appendN(t, q, 0, 10) // 8 dropped
	if n := strings.Count(logs.String(), "queue full"); n != 1 {
		t.Fatalf("%d log lines for 8 drops within a minute, want 1:\n%s", n, logs.String())
	}
	now = now.Add(dropLogInterval)
	appendN(t, q, 10, 1)
	if n := strings.Count(logs.String(), "queue full"); n != 2 || !strings.Contains(logs.String(), `"dropped":8,"dropped_total":9`) {
		t.Errorf("an hour later, want a second line with the 8 drops since the first:\n%s", logs.String())
	}
}

func TestQueueCapByBytesDropsOldest(t *testing.T) {
	// Each record is 8 header + 2 + 9 topic + 9 payload = 28 bytes.
	q := openTestQueue(t, t.TempDir(), QueueOptions{MaxBytes: 28 * 4})
	appendN(t, q, 0, 10)
	wantRange(t, payloads(t, q), 6, 10)
	p, b, d := q.Stats()
	if p != 4 || b != 28*4 || d != 6 {
		t.Errorf("Stats = %d pending, %d bytes, %d dropped; want 4, 112, 6", p, b, d)
	}
	if err := q.Append("telemetry", make([]byte, 200)); err == nil {
		t.Error("a record larger than the whole queue was accepted")
	}
	wantRange(t, payloads(t, q), 6, 10) // a refused record drops nothing
}

func TestQueueSurvivesReopen(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{SegmentBytes: 100} // several segments
	q := openTestQueue(t, dir, opts)
	appendN(t, q, 0, 20)
	recs, _ := q.Peek(5)
	if err := q.Ack(recs[4].Seq); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = openTestQueue(t, dir, opts)
	wantRange(t, payloads(t, q), 5, 20)
	// Appends after reopen go after the old ones, with new seqs.
	appendN(t, q, 20, 3)
	got, _ := q.Peek(1 << 30)
	wantRange(t, payloads(t, q), 5, 23)
	for i := 1; i < len(got); i++ {
		if got[i].Seq <= got[i-1].Seq {
			t.Fatalf("seq not increasing after reopen: %d then %d", got[i-1].Seq, got[i].Seq)
		}
	}
}

func TestQueueUnsyncedAckRedeliversAfterCrash(t *testing.T) {
	dir := t.TempDir()
	q := openTestQueue(t, dir, QueueOptions{})
	appendN(t, q, 0, 5)
	if err := q.Sync(); err != nil {
		t.Fatal(err)
	}
	recs, _ := q.Peek(2)
	if err := q.Ack(recs[1].Seq); err != nil {
		t.Fatal(err)
	}
	// Simulated crash: no Sync or Close, so the pointer was not saved; the
	// acknowledged messages come again (at least once), none is lost.
	q2 := openTestQueue(t, dir, QueueOptions{})
	wantRange(t, payloads(t, q2), 0, 5)
}

func TestQueueReleasesDeliveredSegments(t *testing.T) {
	dir := t.TempDir()
	q := openTestQueue(t, dir, QueueOptions{SegmentBytes: 56}) // 2 records of 28 bytes per segment
	appendN(t, q, 0, 10)
	segs := func() int {
		names, err := segmentNames(filepath.Join(dir))
		if err != nil {
			t.Fatal(err)
		}
		return len(names)
	}
	if n := segs(); n != 5 {
		t.Fatalf("%d segments, want 5", n)
	}
	recs, _ := q.Peek(10)
	if err := q.Ack(recs[9].Seq); err != nil {
		t.Fatal(err)
	}
	if n := segs(); n != 1 {
		t.Errorf("%d segments after acking everything, want 1 (the open tail)", n)
	}
}

func TestQueueTornTail(t *testing.T) {
	for _, cut := range []int{1, 5, 8, 12} { // inside the header and inside the body
		t.Run(fmt.Sprintf("cut%d", cut), func(t *testing.T) {
			dir := t.TempDir()
			q := openTestQueue(t, dir, QueueOptions{})
			appendN(t, q, 0, 6)
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			names, _ := segmentNames(dir)
			path := filepath.Join(dir, names[len(names)-1])
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			// Leave the last record partly written, as a crash mid-append would.
			if err := os.Truncate(path, st.Size()-28+int64(cut)); err != nil {
				t.Fatal(err)
			}
			q = openTestQueue(t, dir, QueueOptions{})
			wantRange(t, payloads(t, q), 0, 5)
			appendN(t, q, 5, 2)
			wantRange(t, payloads(t, q), 0, 7)
			// And once more from disk: the cut tail does not hide new records.
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			q = openTestQueue(t, dir, QueueOptions{})
			wantRange(t, payloads(t, q), 0, 7)
		})
	}
}

func TestQueueEmptySegmentAfterCrash(t *testing.T) {
	dir := t.TempDir()
	q := openTestQueue(t, dir, QueueOptions{})
	appendN(t, q, 0, 3)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	// A segment created right before a crash, with nothing in it, named
	// with the seq the next append will use.
	if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seg-%020d.log", 3)), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	q = openTestQueue(t, dir, QueueOptions{})
	appendN(t, q, 3, 2)
	wantRange(t, payloads(t, q), 0, 5)
}

func TestQueueFilesArePrivate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "q")
	q := openTestQueue(t, dir, QueueOptions{})
	appendN(t, q, 0, 2)
	recs, _ := q.Peek(1)
	_ = q.Ack(recs[0].Seq)
	if err := q.Sync(); err != nil {
		t.Fatal(err)
	}
	err := filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		want := os.FileMode(0o600)
		if info.IsDir() {
			want = 0o700
		}
		if info.Mode().Perm() != want {
			t.Errorf("%s mode %v, want %v", path, info.Mode().Perm(), want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestQueueReady(t *testing.T) {
	q := openTestQueue(t, t.TempDir(), QueueOptions{})
	select {
	case <-q.Ready():
		t.Fatal("empty queue signals ready")
	default:
	}
	appendN(t, q, 0, 1)
	select {
	case <-q.Ready():
	default:
		t.Fatal("append did not signal ready")
	}
}

func TestQueueFlushSavesPointerOncePerInterval(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	opts := QueueOptions{PointerInterval: time.Minute, Now: func() time.Time { return now }}
	q := openTestQueue(t, dir, opts)
	appendN(t, q, 0, 4)
	recs, _ := q.Peek(2)
	if err := q.Ack(recs[1].Seq); err != nil {
		t.Fatal(err)
	}
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, ackFile)); !os.IsNotExist(err) {
		t.Fatal("pointer saved before its interval")
	}
	// Appended records are durable after Flush even so: a crash now
	// redelivers, never loses.
	q2 := openTestQueue(t, dir, QueueOptions{})
	wantRange(t, payloads(t, q2), 0, 4)
	_ = q2.Close()

	now = now.Add(time.Minute)
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	q3 := openTestQueue(t, dir, QueueOptions{})
	wantRange(t, payloads(t, q3), 2, 4)
}

// wantMsgs checks the pending payloads are msg-N for each N of want, in order.
func wantMsgs(tb testing.TB, got []string, want []int) {
	tb.Helper()
	w := make([]string, len(want))
	for i, n := range want {
		w[i] = fmt.Sprintf("msg-%05d", n)
	}
	if !slices.Equal(got, w) {
		tb.Fatalf("pending %v, want %v", got, w)
	}
}

// Corrupt records are lost and count as dropped, once (not again at the
// next open) and durably; the valid records after them are kept, and a torn
// or corrupt tail is cut.
func TestQueueCorruptRecordsCountAsDropped(t *testing.T) {
	const rec = 28 // bytes per record of appendN
	flip := func(t *testing.T, path string, at int) {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b[at] ^= 0xff
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// zero clears [from, to) of a segment, as a sector lost to a power cut.
	zero := func(t *testing.T, path string, from, to int) {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		clear(b[from:to])
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	seg := func(t *testing.T, dir string, i int) string {
		t.Helper()
		names, err := segmentNames(dir)
		if err != nil || len(names) <= i {
			t.Fatalf("segments %v: %v", names, err)
		}
		return filepath.Join(dir, names[i])
	}
	cases := []struct {
		name    string
		opts    QueueOptions
		n       int
		ack     int // records acknowledged (delivered) before the damage
		damage  func(t *testing.T, dir string)
		keep    []int // msg numbers left, in order
		dropped uint64
	}{
		{"flipped payload in the last segment", QueueOptions{}, 4, 0, func(t *testing.T, dir string) {
			flip(t, seg(t, dir, 0), 1*rec+20) // second record of four
		}, []int{0, 2, 3}, 1},
		{"flipped length in the last segment", QueueOptions{}, 4, 0, func(t *testing.T, dir string) {
			flip(t, seg(t, dir, 0), 1*rec+3) // length: found again by its successor
		}, []int{0, 2, 3}, 1},
		{"two flipped payloads", QueueOptions{}, 6, 0, func(t *testing.T, dir string) {
			flip(t, seg(t, dir, 0), 1*rec+20)
			flip(t, seg(t, dir, 0), 3*rec+20)
		}, []int{0, 2, 4, 5}, 2},
		{"zeroed stretch in the last segment", QueueOptions{}, 6, 0, func(t *testing.T, dir string) {
			zero(t, seg(t, dir, 0), 1*rec+5, 3*rec+3) // records 1 to 3
		}, []int{0, 4, 5}, 1}, // at least one: how many it held is unknown
		{"zeroed stretch behind the pointer", QueueOptions{}, 6, 5, func(t *testing.T, dir string) {
			zero(t, seg(t, dir, 0), 1*rec+5, 3*rec+3)
		}, []int{4, 5}, 0}, // 4 again rather than 5 never: it was not delivered
		{"torn last record", QueueOptions{}, 4, 0, func(t *testing.T, dir string) {
			if err := os.Truncate(seg(t, dir, 0), 4*rec-5); err != nil {
				t.Fatal(err)
			}
		}, []int{0, 1, 2}, 1},
		{"flipped payload of the last record", QueueOptions{}, 4, 0, func(t *testing.T, dir string) {
			flip(t, seg(t, dir, 0), 3*rec+20)
		}, []int{0, 1, 2}, 1},
		{"zeroed stretch in a middle segment", QueueOptions{SegmentBytes: 4 * rec}, 12, 0, func(t *testing.T, dir string) {
			zero(t, seg(t, dir, 1), 0, 2*rec+3) // records 4 to 6
		}, []int{0, 1, 2, 3, 7, 8, 9, 10, 11}, 3}, // exact: the next segment's name says how many
		{"garbage tail of a middle segment", QueueOptions{SegmentBytes: 3 * rec}, 9, 0, func(t *testing.T, dir string) {
			flip(t, seg(t, dir, 1), 3) // first record's length; nothing valid after it
			zero(t, seg(t, dir, 1), 1*rec, 3*rec)
		}, []int{0, 1, 2, 6, 7, 8}, 3},
		{"corrupt record delivered before", QueueOptions{}, 4, 2, func(t *testing.T, dir string) {
			flip(t, seg(t, dir, 0), 1*rec+20)
		}, []int{2, 3}, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			q := openTestQueue(t, dir, c.opts)
			appendN(t, q, 0, c.n)
			if c.ack > 0 {
				recs, _ := q.Peek(c.ack)
				if err := q.Ack(recs[c.ack-1].Seq); err != nil {
					t.Fatal(err)
				}
			}
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			c.damage(t, dir)
			q = openTestQueue(t, dir, c.opts)
			wantMsgs(t, payloads(t, q), c.keep)
			if _, _, d := q.Stats(); d != c.dropped {
				t.Errorf("dropped = %d, want %d", d, c.dropped)
			}
			// Counted durably, and once: a crash now, or a clean restart,
			// keeps the count and the records as they are.
			q2 := openTestQueue(t, dir, c.opts)
			wantMsgs(t, payloads(t, q2), c.keep)
			if _, _, d := q2.Stats(); d != c.dropped {
				t.Errorf("dropped after a crash and reopen = %d, want %d", d, c.dropped)
			}
			// New records follow the kept ones, in order, across a restart.
			appendN(t, q2, 100, 2)
			if err := q2.Close(); err != nil {
				t.Fatal(err)
			}
			q3 := openTestQueue(t, dir, c.opts)
			wantMsgs(t, payloads(t, q3), append(slices.Clone(c.keep), 100, 101))
		})
	}
}

// limitFileSize sets this process's file size limit (RLIMIT_FSIZE) until
// the returned func: every write past it fails with EFBIG, as writes do on
// a full disk. Go ignores SIGXFSZ, so only the write fails.
func limitFileSize(tb testing.TB, n uint64) (restore func()) {
	tb.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
		tb.Fatal(err)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: n, Max: old.Max}); err != nil {
		tb.Fatal(err)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
				tb.Fatal(err)
			}
		})
	}
	tb.Cleanup(restore)
	return restore
}

// TestQueueFullDisk: records that cannot be written are held in memory,
// within MemoryBytes (the oldest held dropped first), delivered in order
// with those on disk; disk writes resume when they can, and the sequence
// numbers stay consistent across a reopen, memory-held records counted as
// dropped when the queue closes with them.
func TestQueueFullDisk(t *testing.T) {
	dir := t.TempDir()
	recSize := int64(recordHeader + 2 + len("telemetry") + len("msg-00000"))
	opts := QueueOptions{MemoryBytes: 5 * recSize}
	q := openTestQueue(t, dir, opts)
	appendN(t, q, 0, 5)

	restore := limitFileSize(t, 0)
	appendN(t, q, 5, 10) // 5..9 dropped from memory for 10..14
	restore()
	appendN(t, q, 15, 5)

	got := payloads(t, q)
	want := []string{}
	for _, i := range []int{0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19} {
		want = append(want, fmt.Sprintf("msg-%05d", i))
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("pending %v, want %v", got, want)
	}
	if pending, _, dropped := q.Stats(); pending != 15 || dropped != 5 {
		t.Fatalf("pending %d dropped %d, want 15 and 5", pending, dropped)
	}
	if err := q.Ack(2); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}

	q = openTestQueue(t, dir, opts)
	recs, err := q.Peek(100)
	if err != nil {
		t.Fatal(err)
	}
	var seqs []string
	for _, r := range recs {
		seqs = append(seqs, fmt.Sprintf("%d:%s", r.Seq, r.Payload))
	}
	if want := "[3:msg-00003 4:msg-00004 15:msg-00015 16:msg-00016 17:msg-00017 18:msg-00018 19:msg-00019]"; fmt.Sprint(seqs) != want {
		t.Fatalf("after reopen %v, want %s", seqs, want)
	}
	if _, _, dropped := q.Stats(); dropped != 10 {
		t.Errorf("dropped %d after reopen, want 10 (5 for room, 5 held in memory at close)", dropped)
	}
	appendN(t, q, 20, 1)
	if recs, _ := q.Peek(100); recs[len(recs)-1].Seq != 20 {
		t.Errorf("next append got seq %d, want 20", recs[len(recs)-1].Seq)
	}
	if err := q.Ack(20); err != nil {
		t.Fatal(err)
	}
	if pending, _, _ := q.Stats(); pending != 0 {
		t.Errorf("%d pending after acking everything", pending)
	}
}
