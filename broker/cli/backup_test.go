package cli

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
)

// serveAdmin answers the admin socket of a data folder with h, standing in
// for a server that fails mid-backup (a real one cannot be made to fail at
// a chosen byte).
func serveAdmin(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	data, ln := adminListener(t)
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return data
}

// adminListener makes a data folder in t.TempDir() and listens on its
// admin socket; the caller closes the listener.
func adminListener(t *testing.T) (string, net.Listener) {
	t.Helper()
	data := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(data, admin.SocketName))
	if err != nil {
		t.Fatal(err)
	}
	return data, ln
}

func runBackup(t *testing.T, data, dir string) (string, int) {
	t.Helper()
	var out, errs bytes.Buffer
	code := Main(context.Background(), []string{"backup", "--data", data, dir}, Env{Stdout: &out, Stderr: &errs, Getenv: func(string) string { return "" }})
	return out.String() + errs.String(), code
}

// A backup that fails — the stream cut short, or a copy that is not a
// database — leaves nothing: no partial file, and no folder it created.
func TestFailedBackupLeavesNothing(t *testing.T) {
	cut := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(1<<20))
		w.Header().Set(admin.SnapshotHeader, time.Now().Format(time.RFC3339Nano))
		w.WriteHeader(http.StatusOK)
		w.Write(make([]byte, 4096))
		panic(http.ErrAbortHandler) // the server died mid-stream
	})
	junk := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(admin.SnapshotHeader, time.Now().Format(time.RFC3339Nano))
		w.Write(bytes.Repeat([]byte("not a database "), 4096))
	})
	for _, tc := range []struct {
		name, data, want string
		existing         bool
	}{
		{"cut short, new folder", cut, "cut short", false},
		{"cut short, empty folder", cut, "cut short", true},
		{"not a database", junk, "backup does not open", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "backup")
			if tc.existing {
				if err := os.Mkdir(dir, 0o700); err != nil {
					t.Fatal(err)
				}
			}
			out, code := runBackup(t, tc.data, dir)
			if code != 1 || !strings.Contains(out, tc.want) {
				t.Fatalf("exit %d, want 1 and %q:\n%s", code, tc.want, out)
			}
			entries, err := os.ReadDir(dir)
			switch {
			case tc.existing && (err != nil || len(entries) != 0):
				t.Fatalf("the folder given was changed: %v %v", entries, err)
			case !tc.existing && !os.IsNotExist(err):
				t.Fatalf("the folder it created is still there: %v %v", entries, err)
			}
		})
	}
}

// Right after the binary is upgraded, the server running is the old one:
// one from before `fleetmq backup` has no such endpoint, one from before
// restores took devices back sends no snapshot time. The backup says to
// restart the server, and leaves nothing.
func TestBackupOfAnOlderServer(t *testing.T) {
	noEndpoint := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"code":"not_found","message":"no such admin endpoint: GET /v1/backup"}`))
	})
	noSnapshotTime := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Write(bytes.Repeat([]byte("a database "), 4096))
	})
	for name, data := range map[string]string{"no endpoint": noEndpoint, "no snapshot time": noSnapshotTime} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "backup")
			out, code := runBackup(t, data, dir)
			if code != 1 || !strings.Contains(out, "older than this fleetmq") || !strings.Contains(out, "restart it with this version") {
				t.Fatalf("exit %d, want 1 and what to do:\n%s", code, out)
			}
			if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("the failed backup left its folder: %v", err)
			}
		})
	}
}

// A backup inside the data folder would be lost with it: refused before
// anything is asked of the server or written.
func TestBackupRefusesTheDataFolder(t *testing.T) {
	var asked atomic.Bool
	data := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) { asked.Store(true) })
	for _, dir := range []string{data, filepath.Join(data, "inner"), filepath.Join(data, "a", "..", "b")} {
		out, code := runBackup(t, data, dir)
		if code != 2 || !strings.Contains(out, "inside the data folder") {
			t.Errorf("backup %s: exit %d\n%s", dir, code, out)
		}
	}
	if _, err := os.Stat(filepath.Join(data, "inner")); err == nil || asked.Load() {
		t.Fatalf("a refused backup wrote something or asked the server (%v)", asked.Load())
	}
	for path, want := range map[string]bool{"/x/data/../data/y": true, "/x/data2": false, "/x": false} {
		if got, err := inside(path, "/x/data"); got != want || err != nil {
			t.Errorf("inside(%s, /x/data) = %v, %v", path, got, err)
		}
	}
}

// Nor through a symlink: to a folder that exists, or to one a component
// of the path leads into ("link/.." is the parent of the link's target).
func TestBackupRefusesTheDataFolderThroughSymlinks(t *testing.T) {
	var asked atomic.Bool
	data := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) { asked.Store(true) })
	if err := os.Mkdir(filepath.Join(data, "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	links := t.TempDir()
	for name, target := range map[string]string{"data": data, "sub": filepath.Join(data, "sub")} {
		if err := os.Symlink(target, filepath.Join(links, name)); err != nil {
			t.Fatal(err)
		}
	}
	for _, dir := range []string{"data/bk", "data", "sub/../bk", "sub/new/bk"} {
		out, code := runBackup(t, data, links+"/"+dir) // not Join: it would clean "sub/.."
		if code != 2 || !strings.Contains(out, "inside the data folder") {
			t.Errorf("backup %s: exit %d\n%s", dir, code, out)
		}
	}
	if entries, err := os.ReadDir(data); err != nil || len(entries) != 2 || asked.Load() {
		t.Fatalf("a refused backup wrote into the data folder (%v %v) or asked the server (%v)", entries, err, asked.Load())
	}
}

// A file given as the backup folder is refused as the usage error it is,
// before the server is asked, and left as it was.
func TestBackupRefusesAFile(t *testing.T) {
	var asked atomic.Bool
	data := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) { asked.Store(true) })
	file := filepath.Join(t.TempDir(), "notes.txt")
	if err := os.WriteFile(file, []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, code := runBackup(t, data, file)
	if code != 2 || !strings.Contains(out, "is a file, not a folder") {
		t.Fatalf("exit %d, want 2 and why:\n%s", code, out)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "mine" || asked.Load() {
		t.Fatalf("the file: %q %v; server asked: %v", b, err, asked.Load())
	}
}

// lockDir holds the lock a running backup holds on its folder, until the
// test ends.
func lockDir(t *testing.T, dir string) {
	t.Helper()
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatal(err)
	}
}

// A second backup into a folder another backup is writing into is refused
// before it asks the server for anything, and the other's unfinished copy
// is left alone: it is not what a killed backup leaves.
func TestBackupRefusesAFolderInUse(t *testing.T) {
	var asked atomic.Bool
	data := serveAdmin(t, func(w http.ResponseWriter, r *http.Request) { asked.Store(true) })
	dir := filepath.Join(t.TempDir(), "backup")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	partial := filepath.Join(dir, "fleetmq.db.partial")
	if err := os.WriteFile(partial, []byte("the other backup's copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	lockDir(t, dir)
	out, code := runBackup(t, data, dir)
	if code != 2 || !strings.Contains(out, "another fleetmq backup is writing into it") {
		t.Fatalf("exit %d, want 2 and why:\n%s", code, out)
	}
	if b, err := os.ReadFile(partial); err != nil || string(b) != "the other backup's copy" || asked.Load() {
		t.Fatalf("the other backup's copy: %q %v; server asked: %v", b, err, asked.Load())
	}
}

// The check never passes a database it made itself: with the copy gone
// it fails, and creates nothing.
func TestCheckBackupOfAMissingCopy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fleetmq.db.partial")
	if n, err := checkBackup(context.Background(), path, time.Now()); err == nil || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("checked a missing copy: %d identities, %v", n, err)
	}
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the check created %s: %v", path, err)
	}
}

// Keeping the checked copy never replaces a database already there, also
// where the file system has no hard links (FAT: link fails with EPERM) and
// the copy is copied.
func TestKeepNeverReplaces(t *testing.T) {
	noLinks := func(oldname, newname string) error {
		return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: syscall.EPERM}
	}
	for name, link := range map[string]func(string, string) error{"links": os.Link, "no links": noLinks} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			partial, dst := filepath.Join(dir, "fleetmq.db.partial"), filepath.Join(dir, "fleetmq.db")
			for p, b := range map[string]string{partial: "new", dst: "there before"} {
				if err := os.WriteFile(p, []byte(b), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := keep(link, partial, dst); !errors.Is(err, fs.ErrExist) {
				t.Fatalf("keep over an existing file: %v", err)
			}
			if b, err := os.ReadFile(dst); err != nil || string(b) != "there before" {
				t.Fatalf("the file there was replaced: %q %v", b, err)
			}
			if err := os.Remove(dst); err != nil {
				t.Fatal(err)
			}
			if n, err := keep(link, partial, dst); err != nil || n != 3 {
				t.Fatalf("keep: %d %v", n, err)
			}
			if b, err := os.ReadFile(dst); err != nil || string(b) != "new" {
				t.Fatalf("kept %q %v, want the checked copy", b, err)
			}
			if fi, err := os.Stat(dst); err != nil || fi.Mode().Perm() != 0o600 {
				t.Fatalf("kept copy: %v %v, want mode 0600", fi.Mode(), err)
			}
			if _, err := os.Stat(partial); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("the partial name is still there: %v", err)
			}
		})
	}
	// Any other failure to link is an error, not a reason to copy.
	dir := t.TempDir()
	partial, dst := filepath.Join(dir, "fleetmq.db.partial"), filepath.Join(dir, "fleetmq.db")
	if err := os.WriteFile(partial, []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	eio := func(oldname, newname string) error {
		return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: syscall.EIO}
	}
	if _, err := keep(eio, partial, dst); !errors.Is(err, syscall.EIO) {
		t.Fatalf("keep after EIO: %v", err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a copy was made after EIO: %v", err)
	}
}
