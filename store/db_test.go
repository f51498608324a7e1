package store_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fleetmq/fleetmq/store"
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func TestOpenCreatesPrivateFileAndPersists(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{})
	if err := db.SetPresence(ctx, store.Presence{DeviceID: "dev-1", Online: true, LastSeen: t0}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("second Close: %v, want ErrClosed", err)
	}
	if _, err := db.Presences(ctx); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("read after Close: %v, want ErrClosed", err)
	}
	if err := db.SetPresence(ctx, store.Presence{DeviceID: "x"}); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("write after Close: %v, want ErrClosed", err)
	}
	assertMode(t, path)

	db = store.OpenTestPath(t, path, store.Options{})
	ps, err := db.Presences(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p := ps["dev-1"]; !p.Online || !p.LastSeen.Equal(t0) || len(ps) != 1 {
		t.Fatalf("after reopen: %+v", ps)
	}
}

func TestOpenTightensExistingFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fleet.db")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil { // whatever the umask did
		t.Fatal(err)
	}
	store.OpenTestPath(t, path, store.Options{})
	assertMode(t, path)
}

func assertMode(tb testing.TB, path string) {
	tb.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		tb.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		tb.Fatalf("mode %v, want 0600", m)
	}
}

func TestOpenLockedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fleet.db")
	store.OpenTestPath(t, path, store.Options{})
	start := time.Now()
	db, err := store.Open(path, store.Options{LockTimeout: 50 * time.Millisecond})
	if err == nil {
		db.Close()
		t.Fatal("second Open of a locked file succeeded")
	}
	if !errors.Is(err, store.ErrLocked) {
		t.Fatalf("err %v, want ErrLocked", err)
	}
	if !strings.Contains(err.Error(), "another process") {
		t.Fatalf("message %q does not say another process holds the file", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("lock timeout took %v", d)
	}
}

func TestOpenRefusesNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{})
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	setSchema := func(old, v string) {
		t.Helper()
		bdb, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer bdb.Close()
		err = bdb.Update(func(tx *bbolt.Tx) error {
			meta := tx.Bucket([]byte("meta"))
			if got := string(meta.Get([]byte("schema"))); got != old {
				t.Errorf("recorded schema %q, want %q", got, old)
			}
			return meta.Put([]byte("schema"), []byte(v))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	setSchema("1", "2")
	_, err := store.Open(path, store.Options{})
	if !errors.Is(err, store.ErrSchema) || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("open of schema 2: %v, want ErrSchema saying newer", err)
	}
	// The refused open must not have touched the file, and the file must
	// still be openable once the version is supported again.
	setSchema("2", "1")
	store.OpenTestPath(t, path, store.Options{})
}

// A bbolt file of another program (no fleetmq schema version, buckets of
// its own) is refused, byte for byte untouched, rather than made a fleet.
// One with a "meta" bucket, a common name, too.
func TestOpenRefusesAnotherProgramsFile(t *testing.T) {
	for _, bucket := range []string{"retained", "meta"} {
		t.Run(bucket, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "fleet.db")
			bdb, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			err = bdb.Update(func(tx *bbolt.Tx) error {
				b, err := tx.CreateBucket([]byte(bucket))
				if err != nil {
					return err
				}
				return b.Put([]byte("k"), []byte("another program's data"))
			})
			if cerr := bdb.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				t.Fatal(err)
			}
			before, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if db, err := store.Open(path, store.Options{}); err == nil {
				db.Close()
				t.Fatal("opened another program's database as a store")
			} else if !errors.Is(err, store.ErrSchema) || !strings.Contains(err.Error(), "not a fleetmq database") {
				t.Fatalf("open: %v, want ErrSchema saying it is not a fleetmq database", err)
			}
			if after, err := os.ReadFile(path); err != nil || !bytes.Equal(before, after) {
				t.Fatalf("the refused open changed the file (%v)", err)
			}
		})
	}
}

func TestCloseCommitsQueuedWrites(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db := store.OpenTestPath(t, path, store.Options{})
	release := store.BlockWriter(t, db)
	const n = 20
	errs := make(chan error, n)
	for i := range n {
		go func() {
			errs <- db.SetPresence(ctx, store.Presence{DeviceID: "dev-" + string(rune('a'+i)), Online: true})
		}()
	}
	store.WaitQueued(t, db, n)
	closed := make(chan error, 1)
	go func() { closed <- db.Close() }()
	// Close has stopped accepting once reads see ErrClosed; the queued
	// writes are still waiting behind the blocked writer.
	store.WaitFor(t, func() bool {
		_, err := db.Devices(ctx)
		return errors.Is(err, store.ErrClosed)
	})
	release()
	for range n {
		if err := <-errs; err != nil {
			t.Fatalf("queued write: %v", err)
		}
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	db = store.OpenTestPath(t, path, store.Options{})
	ps, err := db.Presences(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != n {
		t.Fatalf("%d presences after reopen, want %d", len(ps), n)
	}
}

func TestCanceledRequestIsSkipped(t *testing.T) {
	db := store.OpenTest(t)
	release := store.BlockWriter(t, db)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- db.SetPresence(ctx, store.Presence{DeviceID: "dev-1"}) }()
	store.WaitQueued(t, db, 1)
	cancel()
	// The answer comes while the writer is still blocked: the caller does
	// not wait for its turn to learn that it gave up.
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	release()
	// A later write is committed after the skipped one would have been.
	if err := db.SetPresence(context.Background(), store.Presence{DeviceID: "dev-2"}); err != nil {
		t.Fatal(err)
	}
	ps, err := db.Presences(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ps["dev-1"]; ok || len(ps) != 1 {
		t.Fatalf("presences %v: the canceled write ran", ps)
	}

	done, cancelDone := context.WithCancel(context.Background())
	cancelDone()
	if err := db.SetPresence(done, store.Presence{DeviceID: "dev-3"}); !errors.Is(err, context.Canceled) {
		t.Fatalf("already canceled: %v", err)
	}
}

var errBoom = errors.New("boom")

// A request that fails after writing, inside a group, must leave no trace,
// and every other request of the group must still be committed.
func TestFailingRequestDoesNotAffectItsGroup(t *testing.T) {
	ctx := context.Background()
	db := store.OpenTest(t)
	hash := tokenHash("group")
	mustCreateTokens(t, db, store.Token{ID: "group", Hash: hash, MaxUses: 1, ExpiresAt: t0.Add(time.Hour)})

	var mu sync.Mutex
	var groups []int
	store.SetGroupHook(db, func(n int) {
		mu.Lock()
		groups = append(groups, n)
		mu.Unlock()
	})
	release := store.BlockWriter(t, db)

	type result struct {
		name string
		err  error
	}
	results := make(chan result, 5)
	run := func(name string, f func() error) { go func() { results <- result{name, f()} }() }
	run("presence", func() error { return db.SetPresence(ctx, store.Presence{DeviceID: "p"}) })
	run("telemetry", func() error {
		return db.AppendTelemetry(ctx, []store.Message{{DeviceID: "p", Topic: "t", Received: t0, Payload: []byte("x")}})
	})
	run("boom", func() error {
		return store.UpdateRaw(ctx, db, func(tx *bbolt.Tx) error {
			if err := tx.Bucket([]byte("presence")).Put([]byte("boom"), []byte("{}")); err != nil {
				return err
			}
			return errBoom
		})
	})
	// Both pass the read-only pre-check while the writer is blocked, so the
	// loser fails inside the group.
	for _, id := range []string{"e1", "e2"} {
		run(id, func() error { return db.Enroll(ctx, enrollment(hash, id, "s-"+id)) })
	}
	store.WaitQueued(t, db, 5)
	release()

	got := map[string]error{}
	for range 5 {
		r := <-results
		got[r.name] = r.err
	}
	if got["presence"] != nil || got["telemetry"] != nil {
		t.Fatalf("innocent requests failed: %v", got)
	}
	if !errors.Is(got["boom"], errBoom) {
		t.Fatalf("boom: %v", got["boom"])
	}
	e1, e2 := got["e1"], got["e2"]
	if (e1 == nil) == (e2 == nil) || !(errors.Is(e1, store.ErrTokenUsed) || errors.Is(e2, store.ErrTokenUsed)) {
		t.Fatalf("enrollments: e1=%v e2=%v, want one success and one ErrTokenUsed", e1, e2)
	}
	ps, err := db.Presences(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ps["boom"]; ok || len(ps) != 1 {
		t.Fatalf("presences %v: want only p", ps)
	}
	msgs, err := db.Telemetry(ctx, "p", time.Time{}, 0)
	if err != nil || len(msgs) != 1 {
		t.Fatalf("telemetry %v %v", msgs, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(groups) != 1 || groups[0] != 3 {
		t.Fatalf("committed groups %v, want one group of 3", groups)
	}
}

// TestOpenDamagedFile: a database cut short (a copy that did not finish)
// or overwritten is refused by Open with ErrDamaged and what to do, not a
// crash, and the file is left as it was.
func TestOpenDamagedFile(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.db")
	db, err := store.Open(good, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		if err := db.SetPresence(ctx, store.Presence{DeviceID: fmt.Sprintf("dev-%03d-%s", i, strings.Repeat("x", 200)), LastSeen: t0}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	for name, damage := range map[string]func([]byte) []byte{
		"cut short": func(b []byte) []byte { return b[:3*4096] },
		"overwritten": func(b []byte) []byte {
			b = bytes.Clone(b)
			for i := 2 * 4096; i < len(b); i++ {
				b[i] = byte(i*7 + 3)
			}
			return b
		},
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".db")
			bad := damage(raw)
			if err := os.WriteFile(path, bad, 0o600); err != nil {
				t.Fatal(err)
			}
			db, err := store.Open(path, store.Options{})
			if err == nil {
				db.Close()
				t.Fatal("a damaged file opened")
			}
			if !errors.Is(err, store.ErrDamaged) || !strings.Contains(err.Error(), "restore fleetmq.db from a backup") {
				t.Fatalf("error %q is not ErrDamaged with what to do", err)
			}
			if after, err := os.ReadFile(path); err != nil || !bytes.Equal(after, bad) {
				t.Fatalf("the refused open changed the file (%v)", err)
			}
		})
	}
}

// TestDamageMetAfterOpen: a damaged page that Open does not read — a
// device's telemetry, read a minute later by the retention loop — was a
// panic on that goroutine, and under systemd's Restart= a crash loop. It is
// now an error for that read, the store refuses writes from then on, and
// Damaged says so for the readiness check; undamaged pages still read.
func TestDamageMetAfterOpen(t *testing.T) {
	ctx := context.Background()
	path := withDamagedPage(t, false)
	db, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatalf("open: %v (the damage is in a page Open does not read)", err)
	}
	defer db.Close()
	if db.Damaged() != nil {
		t.Fatal("damaged before any damage was read")
	}
	if got, err := db.Telemetry(ctx, "dev-good", time.Time{}, 0); err != nil || len(got) != 1 {
		t.Fatalf("undamaged telemetry: %d messages, %v", len(got), err)
	}
	if _, err := db.Telemetry(ctx, "dev-bad", time.Time{}, 0); !errors.Is(err, store.ErrDamaged) {
		t.Fatalf("damaged telemetry read: %v, want ErrDamaged", err)
	}
	if _, err := db.PruneTelemetry(ctx, t0.Add(time.Hour), 0); !errors.Is(err, store.ErrDamaged) {
		t.Fatalf("prune over the damaged page: %v, want ErrDamaged", err)
	}
	if err := db.Damaged(); !errors.Is(err, store.ErrDamaged) {
		t.Fatalf("Damaged() = %v", err)
	}
	if err := db.SetPresence(ctx, store.Presence{DeviceID: "dev-good", LastSeen: t0.Add(time.Minute)}); !errors.Is(err, store.ErrDamaged) {
		t.Fatalf("write after damage: %v, want ErrDamaged", err)
	}
	if ps, err := db.Presences(ctx); err != nil || !ps["dev-good"].LastSeen.Equal(t0) {
		t.Fatalf("undamaged presence after refused write: %+v, %v", ps["dev-good"], err)
	}
}

// withDamagedPage writes a store with telemetry of two devices, then
// damages dev-bad's telemetry where Open does not read: with farRoot, its
// bucket's root page number points far past the end of the file (reading
// it is a memory fault); otherwise the header of its root page is
// overwritten.
func withDamagedPage(t *testing.T, farRoot bool) string {
	t.Helper()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	db, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var msgs []store.Message
	for i := range 500 {
		msgs = append(msgs, store.Message{DeviceID: "dev-bad", Topic: "devices/dev-bad/telemetry", Received: t0.Add(time.Duration(i) * time.Second), Payload: bytes.Repeat([]byte("p"), 100)})
	}
	msgs = append(msgs, store.Message{DeviceID: "dev-good", Topic: "devices/dev-good/telemetry", Received: t0, Payload: []byte("ok")})
	if err := db.AppendTelemetry(ctx, msgs); err != nil {
		t.Fatal(err)
	}
	if err := db.SetPresence(ctx, store.Presence{DeviceID: "dev-good", LastSeen: t0}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	bdb, err := bbolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	var page uint64
	err = bdb.View(func(tx *bbolt.Tx) error {
		b := tx.Bucket([]byte("telemetry")).Bucket([]byte("dev-bad"))
		if b == nil || b.Root() == 0 {
			return errors.New("dev-bad's telemetry is not a bucket with pages of its own")
		}
		page = uint64(b.Root())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	pageSize := bdb.Info().PageSize
	if err := bdb.Close(); err != nil {
		t.Fatal(err)
	}
	if farRoot {
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// A bucket's entry in its parent's leaf is its name followed by its
		// header, whose first field is the root page number.
		entry := binary.LittleEndian.AppendUint64([]byte("dev-bad"), page)
		at := bytes.Index(raw, entry)
		if at < 0 || bytes.Contains(raw[at+1:], entry) {
			t.Fatal("dev-bad's bucket entry is not in the file exactly once")
		}
		binary.LittleEndian.PutUint64(raw[at+len("dev-bad"):], 1<<30)
		if err := os.WriteFile(path, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, 16), int64(page)*int64(pageSize)); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestCheckDamagedPage: bbolt's consistency check reads pages on a
// goroutine of its own, where a page number past the end of the file was a
// memory fault no guard could catch — `fleetmq backup` checking its copy
// died with a stack dump. The damage is now met first by a guarded read of
// every page, and Check answers ErrDamaged, as it does for what bbolt's
// check finds itself.
func TestCheckDamagedPage(t *testing.T) {
	for _, farRoot := range []bool{false, true} {
		t.Run(fmt.Sprintf("farRoot=%v", farRoot), func(t *testing.T) {
			db, err := store.Open(withDamagedPage(t, farRoot), store.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			err = db.Check()
			if !errors.Is(err, store.ErrDamaged) || !strings.Contains(err.Error(), "restore fleetmq.db from a backup") {
				t.Fatalf("Check() = %v, want ErrDamaged with what to do", err)
			}
		})
	}
}
