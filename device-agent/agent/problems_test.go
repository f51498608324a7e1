package agent

// Tests of what the agent says and does when the state folder is not as it
// left it: broken or foreign identities, an unreadable state.json, a key
// others can read, a folder owned by the service user while root runs.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// enrolledDir is a state folder enrolled as pi-1 with a fake server.
func enrolledDir(tb testing.TB) (*fakeServer, string) {
	tb.Helper()
	f := newFakeServer(tb, newTestCA(tb))
	dir := filepath.Join(tb.TempDir(), "state")
	enrollTest(tb, f, dir, "pi-1")
	return f, dir
}

func TestStatusReportsBrokenIdentity(t *testing.T) {
	cases := []struct {
		name    string
		breakIt func(t *testing.T, f *fakeServer, dir string)
		want    string // in Broken
	}{
		{"garbage cert.pem", func(t *testing.T, _ *fakeServer, dir string) {
			writeFile(t, filepath.Join(dir, certFile), []byte("garbage"))
		}, "cert.pem: no certificate in PEM"},
		{"key.pem deleted", func(t *testing.T, _ *fakeServer, dir string) {
			if err := os.Remove(filepath.Join(dir, keyFile)); err != nil {
				t.Fatal(err)
			}
		}, "key.pem is missing"},
		{"another device's cert.pem", func(t *testing.T, f *fakeServer, dir string) {
			other := f.ca.testIdentity(t, "pi-9", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
			writeFile(t, filepath.Join(dir, certFile), other.certPEM())
		}, "cert.pem does not match key.pem"},
		{"garbage key.pem", func(t *testing.T, _ *fakeServer, dir string) {
			writeFile(t, filepath.Join(dir, keyFile), []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
		}, "key.pem: parse key"},
		{"ca.pem missing", func(t *testing.T, _ *fakeServer, dir string) {
			if err := os.Remove(filepath.Join(dir, caFile)); err != nil {
				t.Fatal(err)
			}
		}, "ca.pem missing"},
		{"ca.pem of another fleet", func(t *testing.T, _ *fakeServer, dir string) {
			writeFile(t, filepath.Join(dir, caFile), newTestCA(t).pem)
		}, "cert.pem was not issued by a CA in ca.pem"},
		{"garbage ca.pem", func(t *testing.T, _ *fakeServer, dir string) {
			writeFile(t, filepath.Join(dir, caFile), []byte("garbage"))
		}, "ca.pem: no certificate in PEM; put the fleet's CA bundle back"},
		{"garbage state.json", func(t *testing.T, _ *fakeServer, dir string) {
			writeFile(t, filepath.Join(dir, stateFile), []byte("{garbage"))
		}, "state.json is unreadable"},
		{"state.json deleted", func(t *testing.T, _ *fakeServer, dir string) {
			if err := os.Remove(filepath.Join(dir, stateFile)); err != nil {
				t.Fatal(err)
			}
		}, "state.json is missing"},
		// Written back by hand, as the advice above says, but not quite.
		{"state.json without a server url", func(t *testing.T, _ *fakeServer, dir string) {
			writeFile(t, filepath.Join(dir, stateFile), []byte(`{"broker_url": "mqtts://127.0.0.1:1"}`))
		}, `state.json: server url "": want https://host[:port]; write them back as`},
		{"state.json with a clear-text broker url", func(t *testing.T, f *fakeServer, dir string) {
			writeFile(t, filepath.Join(dir, stateFile), []byte(`{"server_url": "`+f.srv.URL+`", "broker_url": "mqtt://127.0.0.1:1"}`))
		}, `broker url "mqtt://127.0.0.1:1": want mqtts://host:port; write them back as`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, dir := enrolledDir(t)
			c.breakIt(t, f, dir)
			s, err := ReadStatus(dir)
			if err != nil {
				t.Fatalf("ReadStatus: %v", err)
			}
			if !strings.Contains(s.Broken, c.want) || !s.Enrolled {
				t.Errorf("Broken = %q, want %q", s.Broken, c.want)
			}
			// Under systemd's Restart=always, run fails with this every
			// 10 s: the message must say what to do, not only what broke.
			if !strings.Contains(s.Broken, "enroll again under the same id") {
				t.Errorf("Broken = %q, says not what to do", s.Broken)
			}

			code, out, _ := runMain(t, "", nil, "status", "--state-dir", dir)
			if code != 1 || !strings.Contains(out, "attention:    broken: ") || !strings.Contains(out, c.want) {
				t.Errorf("status: exit %d, want 1 and the problem:\n%s", code, out)
			}
			if strings.Contains(out, "serial ,") {
				t.Errorf("status shows an empty serial:\n%s", out)
			}
			code, out, _ = runMain(t, "", nil, "status", "--json", "--state-dir", dir)
			var js map[string]any
			if err := json.Unmarshal([]byte(out), &js); code != 1 || err != nil || !strings.Contains(js["broken"].(string), c.want) {
				t.Errorf("status --json: exit %d, %v\n%s", code, err, out)
			}
			// run refuses to start for the same reason.
			ctx, cancel := context.WithTimeout(context.Background(), waitLong)
			defer cancel()
			err = Run(ctx, Config{StateDir: dir})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Run = %v, want %q", err, c.want)
			}
		})
	}

	// A sound folder: no attention, exit 0.
	_, dir := enrolledDir(t)
	code, out, _ := runMain(t, "", nil, "status", "--state-dir", dir)
	if code != 0 || strings.Contains(out, "attention") || strings.Contains(out, "warning") {
		t.Errorf("healthy status: exit %d\n%s", code, out)
	}
}

// A deleted key.pem is not "not enrolled": that would send a person to
// enroll without --force, and hide that the key is gone.
func TestRunSaysKeyIsMissing(t *testing.T) {
	_, dir := enrolledDir(t)
	if err := os.Remove(filepath.Join(dir, keyFile)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	err := Run(ctx, Config{StateDir: dir})
	if !errors.Is(err, ErrKeyMissing) || errors.Is(err, ErrNotEnrolled) || !strings.Contains(err.Error(), "--reprovision") {
		t.Fatalf("Run = %v, want ErrKeyMissing with what to do", err)
	}
	code, _, errOut := runMain(t, "", nil, "renew", "--state-dir", dir)
	if code != 1 || !strings.Contains(errOut, "key.pem is missing") {
		t.Errorf("renew: exit %d %q", code, errOut)
	}
}

func TestKeyReadableByOthersIsMadePrivate(t *testing.T) {
	_, dir := enrolledDir(t)
	keyPath := filepath.Join(dir, keyFile)
	if err := os.Chmod(keyPath, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := ReadStatus(dir)
	if err != nil || s.Broken != "" || len(s.Warnings) != 1 || !strings.Contains(s.Warnings[0], "mode 0644") {
		t.Errorf("status of a 0644 key: broken %q warnings %q, %v", s.Broken, s.Warnings, err)
	}
	if st, _ := os.Stat(keyPath); st.Mode().Perm() != 0o644 {
		t.Error("status changed the key's mode: it must only read")
	}

	var logs bytes.Buffer
	if _, err := loadIdentity(dir, zerolog.New(&logs)); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(keyPath); st.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v after load, want 0600", st.Mode().Perm())
	}
	if !strings.Contains(logs.String(), `"level":"warn"`) || !strings.Contains(logs.String(), "0644") {
		t.Errorf("no warning logged: %s", logs.String())
	}
	// Group access alone is fixed too.
	if err := os.Chmod(keyPath, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := Renew(context.Background(), Config{StateDir: dir}); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(keyPath); st.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v after renew, want 0600", st.Mode().Perm())
	}
}

func TestUnreadableStateJSON(t *testing.T) {
	f, dir := enrolledDir(t)
	path := filepath.Join(dir, stateFile)
	writeFile(t, path, []byte("{\"device_id\": \"pi-1\", garbage"))
	for _, args := range [][]string{{"renew"}, {"run"}} {
		code, _, errOut := runMain(t, "", nil, append(args, "--state-dir", dir)...)
		for _, w := range []string{path, "server and broker URLs", "removing it does not help", `"broker_url"`, "enroll --force"} {
			if code != 1 || !strings.Contains(errOut, w) {
				t.Errorf("%v: exit %d, message lacks %q:\n%s", args, code, w, errOut)
			}
		}
	}
	// Enrolling again mends it.
	code, _, errOut := runMain(t, f.goodToken()+"\n", nil, "enroll", "--force", "--server", f.srv.URL, "--token", "-", "--state-dir", dir)
	if code != 0 {
		t.Fatalf("enroll --force over an unreadable state.json: %d %s", code, errOut)
	}
	if st, err := readState(dir); err != nil || st.BrokerURL == "" {
		t.Errorf("state after enroll: %+v, %v", st, err)
	}
	// Neither enroll nor renew takes a state.json without a usable URL.
	writeFile(t, path, []byte(`{"broker_url": "mqtts://127.0.0.1:1"}`))
	code, out, errOut := runMain(t, "", nil, "renew", "--state-dir", dir)
	if code != 1 || !strings.Contains(errOut, `server url ""`) {
		t.Errorf("renew without a server url: %d %s %s", code, out, errOut)
	}
	code, out, errOut = runMain(t, f.goodToken()+"\n", nil, "enroll", "--server", f.srv.URL, "--token", "-", "--state-dir", dir)
	if code != 1 || strings.Contains(out, "already enrolled") || !strings.Contains(errOut, `server url ""`) {
		t.Errorf("enroll without --force, state.json without a server url: %d %s %s", code, out, errOut)
	}
	// As does writing the URLs back by hand: the rest is refilled.
	writeFile(t, path, []byte(`{"server_url": "`+f.srv.URL+`", "broker_url": "mqtts://127.0.0.1:1"}`))
	if code, out, errOut := runMain(t, "", nil, "renew", "--state-dir", dir); code != 0 {
		t.Errorf("renew with hand-written state.json: %d %s %s", code, out, errOut)
	}
}

// The way back from a lost state.json that the messages give: the URLs
// written by hand, the rest refilled by run, with no warning that the
// missing id disagrees with the certificate's.
func TestRunRefillsHandWrittenState(t *testing.T) {
	f := newFleet(t, time.Hour)
	st, err := readState(f.dir)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(f.dir, stateFile), []byte(`{"server_url": "`+st.ServerURL+`", "broker_url": "`+st.BrokerURL+`"}`))
	cfg := f.config(t)
	var logs lockedBuffer
	cfg.Logger = zerolog.New(&logs)
	_, _ = startAgent(t, cfg)
	eventually(t, waitLong, "the device id refilled", func() bool {
		st, err := readState(f.dir)
		return err == nil && st.DeviceID == f.id
	})
	if strings.Contains(logs.String(), "disagree") {
		t.Errorf("a warning about the id left out:\n%s", logs.String())
	}
}

// A server certificate the device cannot verify is no network trouble that
// retrying mends: the broker's and the enrollment server's say why and what
// to do (QA: a server set up again with a new CA showed only "x509:
// certificate signed by unknown authority").
func TestUnverifiableServerSaysWhatToDo(t *testing.T) {
	for _, c := range []struct {
		name   string
		server func(t *testing.T, f *fleet) (brokerURL, serverURL string)
		want   string
	}{
		{"another CA", func(t *testing.T, _ *fleet) (string, string) {
			other := newTestCA(t)
			return newHangingBroker(t, other, true).url, newFakeServer(t, other).srv.URL
		}, "the server's certificate is not from the fleet CA in ca.pem"},
		{"another name", func(t *testing.T, f *fleet) (string, string) {
			f.ca.serverNames = []string{"fleet.example"}
			return newHangingBroker(t, f.ca, true).url, newFakeServer(t, f.ca).srv.URL
		}, "the server's certificate does not name 127.0.0.1: start fleetmq with --hostname 127.0.0.1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFleet(t, time.Hour)
			brokerURL, serverURL := c.server(t, f)
			err := (&stateStore{dir: f.dir}).update(context.Background(), func(s *State) {
				s.BrokerURL, s.ServerURL = brokerURL, serverURL
			})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Renew(context.Background(), Config{StateDir: f.dir}); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Renew = %v, want %q", err, c.want)
			}
			_, _ = startAgent(t, f.config(t))
			eventually(t, waitLong, "the broker's certificate refused with advice", func() bool {
				s, err := ReadStatus(f.dir)
				return err == nil && strings.Contains(s.LastError, c.want)
			})
		})
	}
}

// An SD card the kernel remounted read-only after I/O errors (ext4's
// errors=remount-ro) must not silence the device: run starts, publishes
// what it samples from memory, leaves the queue on disk as it is, and
// status says why (QA: "open lock: open run.lock: read-only file system"
// at every restart, and status exit 0). Needs root to mount.
func TestRunOnReadOnlyStateFolder(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a read-only file system")
	}
	f := newFleet(t, time.Hour)
	dir := filepath.Join(t.TempDir(), "card")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=1m,mode=0700"); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	enrollTest(t, f.srv, dir, f.id)
	q := openTestQueue(t, filepath.Join(dir, queueDir), QueueOptions{})
	appendN(t, q, 0, 3)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	l, err := tryLock(filepath.Join(dir, runLock)) // left by an earlier run
	if err != nil {
		t.Fatal(err)
	}
	_ = l.unlock()
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Skipf("cannot remount read-only here: %v", err)
	}

	cfg := f.config(t)
	cfg.StateDir = dir
	_, stop := startAgent(t, cfg)
	if m := f.brk.next(t, deviceTopic(f.id, topicTelemetry), waitLong); !strings.Contains(m.payload, `"uptime_s"`) {
		t.Errorf("telemetry %q, want a fresh sample", m.payload)
	}
	s, err := ReadStatus(dir)
	if err != nil || !s.Running || !strings.Contains(strings.Join(s.Warnings, "\n"), "read-only file system") {
		t.Errorf("status: running %v, warnings %q, %v", s.Running, s.Warnings, err)
	}
	if err := stop(); err != nil {
		t.Errorf("Run = %v", err)
	}
	// The records on disk are still there, for a start that can write.
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT, ""); err != nil {
		t.Fatal(err)
	}
	wantRange(t, payloads(t, openTestQueue(t, filepath.Join(dir, queueDir), QueueOptions{})), 0, 3)
}

// A queue run cannot open for another reason than a read-only card (a file
// where its folder should be, a folder among its segments, as fsck can leave
// them) made run fail at every start, so the device went silent over its
// backlog while status said all was well. run now publishes from memory,
// leaves the queue as it is, and status passes on the advice.
func TestRunWithUnopenableQueue(t *testing.T) {
	segment := segPrefix + "00000000000000000000" + segSuffix
	for name, c := range map[string]struct {
		path  string // below the queue folder ("" for the folder itself)
		isDir bool
	}{
		"queue is a file":     {path: "", isDir: false},
		"segment is a folder": {path: segment, isDir: true},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFleet(t, time.Hour)
			qdir := filepath.Join(f.dir, queueDir)
			damaged := filepath.Join(qdir, c.path)
			var err error
			if c.isDir {
				err = os.MkdirAll(damaged, 0o700)
			} else {
				err = os.WriteFile(damaged, []byte("x"), 0o600)
			}
			if err != nil {
				t.Fatal(err)
			}
			_, stop := startAgent(t, f.config(t))
			if m := f.brk.next(t, deviceTopic(f.id, topicTelemetry), waitLong); !strings.Contains(m.payload, `"uptime_s"`) {
				t.Errorf("telemetry %q, want a fresh sample", m.payload)
			}
			s, err := ReadStatus(f.dir)
			if w := strings.Join(s.Warnings, "\n"); err != nil || !strings.Contains(w, "the offline queue "+qdir+" cannot be opened") ||
				!strings.Contains(w, "mv "+qdir+" "+qdir+".broken") {
				t.Errorf("status: warnings %q, %v", s.Warnings, err)
			}
			if err := stop(); err != nil {
				t.Errorf("Run = %v", err)
			}
			// Left for a person to look at; a stopped agent's old problem is not reported.
			if fi, err := os.Stat(damaged); err != nil || fi.IsDir() != c.isDir {
				t.Errorf("the damaged queue was changed: %v", err)
			}
			if s, err := ReadStatus(f.dir); err != nil || len(s.Warnings) != 0 {
				t.Errorf("status of a stopped agent: warnings %q, %v", s.Warnings, err)
			}
		})
	}
}

// A deleted state.json next to a key pair: enroll without --force must not
// say "already enrolled" (run would then never start).
func TestEnrollWithMissingStateJSON(t *testing.T) {
	f, dir := enrolledDir(t)
	if err := os.Remove(filepath.Join(dir, stateFile)); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runMain(t, f.goodToken()+"\n", nil, "enroll", "--server", f.srv.URL, "--token", "-", "--state-dir", dir)
	if code != 1 || strings.Contains(out, "already enrolled") || !strings.Contains(errOut, "state.json is missing") {
		t.Errorf("enroll: exit %d\n%s%s", code, out, errOut)
	}
	for _, cmd := range []string{"renew", "run"} {
		// The URLs can be written back by hand, as for an unreadable one.
		if code, _, errOut := runMain(t, "", nil, cmd, "--state-dir", dir); code != 1 || !strings.Contains(errOut, "state.json is missing") ||
			!strings.Contains(errOut, `write them back as {"server_url"`) {
			t.Errorf("%s: exit %d %s", cmd, code, errOut)
		}
	}
}

func TestMainMessages(t *testing.T) {
	f := newFakeServer(t, newTestCA(t))
	code, _, errOut := runMain(t, "", nil, "enroll", "--server", f.srv.URL, "--token", "-", "--state-dir", t.TempDir())
	if code == 0 || !strings.Contains(errOut, "the token read from stdin is empty") || strings.Contains(errOut, "are required") {
		t.Errorf("empty token on stdin: %d %q", code, errOut)
	}

	missing := filepath.Join(t.TempDir(), "nonexistent")
	for _, cmd := range []string{"renew", "run"} {
		code, _, errOut = runMain(t, "", nil, cmd, "--state-dir", missing)
		if code != 1 || !strings.Contains(errOut, "state folder "+missing+" does not exist") || !strings.Contains(errOut, "not enrolled") ||
			strings.Contains(errOut, "open lock") {
			t.Errorf("%s in a missing folder: %d %q", cmd, code, errOut)
		}
		if _, err := os.Stat(missing); !os.IsNotExist(err) {
			t.Errorf("%s created the missing state folder", cmd)
		}
	}
	// status says which folder it read: a typo looks like a new device.
	// Not enrolled is not healthy: a monitoring check sees it in the code.
	if code, out, _ := runMain(t, "", nil, "status", "--state-dir", missing); code != ExitNotEnrolled ||
		!strings.Contains(out, "not enrolled: there is no state folder "+missing) {
		t.Errorf("status in a missing folder: %d %q", code, out)
	}
	empty := t.TempDir()
	if code, out, _ := runMain(t, "", nil, "status", "--state-dir", empty); code != ExitNotEnrolled || !strings.Contains(out, "not enrolled (state folder "+empty+")") {
		t.Errorf("status in an empty folder: %d %q", code, out)
	}
	var s Status
	if code, out, _ := runMain(t, "", nil, "status", "--json", "--state-dir", empty); code != ExitNotEnrolled || json.Unmarshal([]byte(out), &s) != nil || s.Enrolled {
		t.Errorf("status --json in an empty folder: %d %q", code, out)
	}
}

// ownedByOther returns a state folder enrolled as pi-1 and owned by another
// user than root, and that user's name and uid; root only.
func ownedByOther(t *testing.T) (f *fakeServer, dir, name string, uid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to hand a folder to another user")
	}
	f, dir = enrolledDir(t)
	uid = 65534 // nobody
	err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, uid)
	})
	if err != nil {
		t.Fatal(err)
	}
	name = "uid " + strconv.Itoa(uid)
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		name = u.Username
	}
	return f, dir, name, uid
}

// folderOfOther is a folder owned by a user other than root: nobody's when
// the tests run as root, else this user's (callers pass root or another
// euid to the functions they test).
func folderOfOther(t *testing.T) (dir string, uid int) {
	t.Helper()
	dir = t.TempDir()
	uid = os.Geteuid()
	if uid == 0 {
		uid = 65534
		if err := os.Chown(dir, uid, uid); err != nil {
			t.Fatal(err)
		}
	}
	return dir, uid
}

func TestCheckStateOwner(t *testing.T) {
	dir, uid := folderOfOther(t)
	err := checkStateOwner(dir, "renew", 0)
	want := "is owned by "
	if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "(uid "+strconv.Itoa(uid)+")") ||
		!strings.Contains(err.Error(), "; run as that user: sudo -u ") || !strings.Contains(err.Error(), " device-agent renew --state-dir "+dir) {
		t.Errorf("root in a folder of uid %d: %v", uid, err)
	}
	if err := checkStateOwner(dir, "renew", uid); err != nil {
		t.Errorf("the owner: %v", err)
	}
	if err := checkStateOwner("/", "renew", 0); err != nil {
		t.Errorf("root in a folder of root's: %v", err)
	}
	if err := checkStateOwner(filepath.Join(dir, "missing"), "enroll", 0); err != nil {
		t.Errorf("root and a folder to create: %v", err)
	}
}

// Another user than the folder's owner meeting "permission denied" in it
// is told whose it is and how to run as that user.
func TestPermissionAdvice(t *testing.T) {
	dir, uid := folderOfOther(t)
	denied := fmt.Errorf("read state: %w", &fs.PathError{Op: "open", Path: filepath.Join(dir, stateFile), Err: fs.ErrPermission})
	err := permissionAdvice(denied, dir, "status", uid+1)
	if !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), "(uid "+strconv.Itoa(uid)+")") ||
		!strings.Contains(err.Error(), "; run as that user: sudo -u ") || !strings.Contains(err.Error(), " device-agent status --state-dir "+dir) {
		t.Errorf("another user: %v", err)
	}
	for _, c := range []struct {
		name string
		err  error
		euid int
	}{
		{"the owner", denied, uid},
		{"root", denied, 0},
		{"another error", errors.New("read state: EOF"), uid + 1},
	} {
		if got := permissionAdvice(c.err, dir, "status", c.euid); got != c.err {
			t.Errorf("%s: advice added: %v", c.name, got)
		}
	}
}

// root running the commands that write into the state folder on a device
// where it belongs to the service user would leave root-owned files the
// service cannot read (key.pem 0600 first of all).
func TestRootRefusesServiceUsersFolder(t *testing.T) {
	f, dir, name, uid := ownedByOther(t)
	keyBefore, _ := os.ReadFile(filepath.Join(dir, keyFile))
	for _, args := range [][]string{
		{"renew"},
		{"run"},
		{"enroll", "--force", "--server", f.srv.URL, "--token", "-"},
		{"enroll", "--server", f.srv.URL, "--token", "-"},
	} {
		code, _, errOut := runMain(t, f.goodToken()+"\n", nil, append(args, "--state-dir", dir)...)
		want := "the state folder " + dir + " is owned by " + name
		if code != 1 || !strings.Contains(errOut, want) || !strings.Contains(errOut, "run as that user: sudo -u "+name+" device-agent "+args[0]) {
			t.Errorf("%v as root: exit %d, want %q:\n%s", args, code, want, errOut)
		}
	}
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if st := info.Sys().(*syscall.Stat_t); int(st.Uid) != uid {
			t.Errorf("%s is owned by uid %d now", p, st.Uid)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if keyAfter, _ := os.ReadFile(filepath.Join(dir, keyFile)); !bytes.Equal(keyBefore, keyAfter) {
		t.Error("the key changed")
	}
	// status only reads: allowed.
	if code, out, errOut := runMain(t, "", nil, "status", "--state-dir", dir); code != 0 || !strings.Contains(out, "pi-1") {
		t.Errorf("status as root: %d\n%s%s", code, out, errOut)
	}
}

// A record the queue skips at start (a corrupt segment) shows as dropped in status.
func TestStatusCountsCorruptRecords(t *testing.T) {
	f := newFleet(t, time.Hour)
	qdir := filepath.Join(f.dir, queueDir)
	q := openTestQueue(t, qdir, QueueOptions{})
	appendN(t, q, 0, 4)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	names, _ := segmentNames(qdir)
	path := filepath.Join(qdir, names[0])
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[28+20] ^= 0xff // second record's payload
	writeFile(t, path, b)
	cfg := f.config(t)
	cfg.Interval = time.Hour
	_, _ = startAgent(t, cfg)
	eventually(t, waitLong, "status shows the corrupt record as dropped", func() bool {
		s, err := ReadStatus(f.dir)
		return err == nil && s.QueueDropped == 1
	})
}
