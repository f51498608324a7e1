package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "key.pem")
	if err := writeFileAtomic(path, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(path, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil || string(b) != "two" {
		t.Fatalf("content %q, %v; want two", b, err)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	if err := writeFileAtomic(filepath.Join(dir, "cert.pem"), []byte("c"), 0o644); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(filepath.Join(dir, "cert.pem")); st.Mode().Perm() != 0o644 {
		t.Errorf("mode %v, want 0644 (umask must not matter)", st.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("temp files left: %v", entries)
	}
}

func TestWriteFileAtomicFailureKeepsOld(t *testing.T) {
	dir := t.TempDir()
	// A non-empty directory in the way makes the final rename fail after
	// the temp file was completely written and synced.
	target := filepath.Join(dir, "state.json")
	if err := os.Mkdir(target, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(target, "old"), []byte("old"))
	if err := writeFileAtomic(target, []byte("new"), 0o600); err == nil {
		t.Fatal("rename over a non-empty directory succeeded")
	}
	if b, _ := os.ReadFile(filepath.Join(target, "old")); string(b) != "old" {
		t.Errorf("old content changed: %q", b)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temp file left after failure: %v", entries)
	}
}

func TestRemoveTemps(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{".key.pem.tmp-123", "key.pem", ".hidden"} {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	removeTemps(dir)
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != ".hidden,key.pem" {
		t.Errorf("left %v", names)
	}
}

func TestLocks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run.lock")
	if locked, err := isLocked(path); err != nil || locked {
		t.Fatalf("isLocked(missing) = %v, %v", locked, err)
	}
	l, err := tryLock(path)
	if err != nil {
		t.Fatal(err)
	}
	// flock locks belong to open file descriptions, so a second open in
	// the same process conflicts like another process would.
	if _, err := tryLock(path); !errors.Is(err, errLocked) {
		t.Fatalf("second tryLock = %v, want errLocked", err)
	}
	if locked, err := isLocked(path); err != nil || !locked {
		t.Fatalf("isLocked(held) = %v, %v", locked, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Millisecond)
	defer cancel()
	if _, err := lock(ctx, path); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("lock on a held lock = %v, want deadline exceeded", err)
	}
	if err := l.unlock(); err != nil {
		t.Fatal(err)
	}
	l2, err := lock(context.Background(), path)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	_ = l2.unlock()
}

func TestStateUpdate(t *testing.T) {
	dir := t.TempDir()
	ss := &stateStore{dir: dir}
	if _, err := readState(dir); !errors.Is(err, ErrNotEnrolled) {
		t.Fatalf("readState(empty) = %v, want ErrNotEnrolled", err)
	}
	if err := ss.update(context.Background(), func(s *State) { s.DeviceID = "pi-1"; s.Connected = true }); err != nil {
		t.Fatal(err)
	}
	if err := ss.update(context.Background(), func(s *State) { s.Connected = false }); err != nil {
		t.Fatal(err)
	}
	s, err := readState(dir)
	if err != nil || s.DeviceID != "pi-1" || s.Connected {
		t.Fatalf("state = %+v, %v", s, err)
	}
	if st, _ := os.Stat(filepath.Join(dir, stateFile)); st.Mode().Perm() != 0o600 {
		t.Errorf("state.json mode %v", st.Mode().Perm())
	}
}

func writeFile(tb testing.TB, path string, b []byte) {
	tb.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		tb.Fatal(err)
	}
}

func TestCommitAndLoadIdentity(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	now := time.Now()
	id := ca.testIdentity(t, "pi-1", now.Add(-time.Minute), now.Add(time.Hour))
	if err := commitIdentity(dir, id); err != nil {
		t.Fatal(err)
	}
	got, err := loadIdentity(dir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if got.deviceID != "pi-1" || got.serial() != id.serial() {
		t.Errorf("loaded %s/%s, want pi-1/%s", got.deviceID, got.serial(), id.serial())
	}
	for name, mode := range map[string]os.FileMode{keyFile: 0o600, certFile: 0o644, caFile: 0o644} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", name, st.Mode().Perm(), mode)
		}
	}
	if _, err := loadIdentity(t.TempDir(), zerolog.Nop()); !errors.Is(err, ErrNotEnrolled) {
		t.Errorf("loadIdentity(empty) = %v, want ErrNotEnrolled", err)
	}
}

// TestLoadIdentityRecoversInterruptedCommit replays a crash at every step of
// commitIdentity and checks that a matching pair is always loaded, the newer
// one once its certificate was completely written.
func TestLoadIdentityRecoversInterruptedCommit(t *testing.T) {
	ca := newTestCA(t)
	now := time.Now()
	old := ca.testIdentity(t, "pi-1", now.Add(-2*time.Hour), now.Add(time.Hour))
	renewed := ca.testIdentity(t, "pi-1", now.Add(-time.Minute), now.Add(3*time.Hour))
	newKeyPEM, err := marshalKey(renewed.key)
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name    string
		crash   func(t *testing.T, dir string)
		wantNew bool
	}{
		{"after ca.next", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, caFile+nextSuffix), renewed.caPEM)
		}, false},
		{"after key.next", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, caFile+nextSuffix), renewed.caPEM)
			writeFile(t, filepath.Join(dir, keyFile+nextSuffix), newKeyPEM)
		}, false},
		{"after cert.next", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, caFile+nextSuffix), renewed.caPEM)
			writeFile(t, filepath.Join(dir, keyFile+nextSuffix), newKeyPEM)
			writeFile(t, filepath.Join(dir, certFile+nextSuffix), renewed.certPEM())
		}, true},
		{"after key rename", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, caFile+nextSuffix), renewed.caPEM)
			writeFile(t, filepath.Join(dir, keyFile), newKeyPEM)
			writeFile(t, filepath.Join(dir, certFile+nextSuffix), renewed.certPEM())
		}, true},
		{"after cert rename", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, caFile+nextSuffix), renewed.caPEM)
			writeFile(t, filepath.Join(dir, keyFile), newKeyPEM)
			writeFile(t, filepath.Join(dir, certFile), renewed.certPEM())
		}, true},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := commitIdentity(dir, old); err != nil {
				t.Fatal(err)
			}
			s.crash(t, dir)
			got, err := loadIdentity(dir, zerolog.Nop())
			if err != nil {
				t.Fatalf("loadIdentity: %v", err)
			}
			want := old
			if s.wantNew {
				want = renewed
			}
			if got.serial() != want.serial() {
				t.Fatalf("loaded serial %s, want %s", got.serial(), want.serial())
			}
			// The repair left the canonical files only, and they load alone.
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				if strings.HasSuffix(e.Name(), nextSuffix) {
					t.Errorf("left %s", e.Name())
				}
			}
			certPEM, _ := os.ReadFile(filepath.Join(dir, certFile))
			keyPEM, _ := os.ReadFile(filepath.Join(dir, keyFile))
			if _, err := newIdentity(keyPEM, certPEM, want.caPEM); err != nil {
				t.Errorf("canonical files do not form a pair: %v", err)
			}
			if !bytes.Equal(certPEM, want.certPEM()) {
				t.Error("cert.pem is not the winner's")
			}
		})
	}
}

func TestLoadIdentityKeyWithoutCertificateIsNotEnrolled(t *testing.T) {
	// A first enrollment that crashed after writing its key: start over
	// without --force.
	dir := t.TempDir()
	k, err := newKey()
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, _ := marshalKey(k)
	writeFile(t, filepath.Join(dir, keyFile+nextSuffix), keyPEM)
	if _, err := loadIdentity(dir, zerolog.Nop()); !errors.Is(err, ErrNotEnrolled) {
		t.Fatalf("loadIdentity = %v, want ErrNotEnrolled", err)
	}
}
