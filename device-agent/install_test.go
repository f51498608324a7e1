package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const testToken = "fmq1.SECRETsecretSECRETsecretSECRETsecretSECR.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// shell prefers dash, a strict POSIX sh, so bashisms fail the test.
func shell(tb testing.TB) string {
	tb.Helper()
	for _, sh := range []string{"dash", "sh"} {
		if p, err := exec.LookPath(sh); err == nil {
			return p
		}
	}
	tb.Skip("no sh")
	return ""
}

// fakeDist is a dist folder with a distinct fake binary per architecture.
func fakeDist(tb testing.TB) string {
	tb.Helper()
	dist := tb.TempDir()
	for _, arch := range []string{"armv6", "armv7", "arm64", "amd64"} {
		if err := os.WriteFile(filepath.Join(dist, "device-agent-linux-"+arch), []byte("#!/bin/sh\necho "+arch+"\n"), 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	return dist
}

type installRun struct {
	out  string
	err  error
	root string
}

func runInstall(tb testing.TB, root, machine string, args ...string) installRun {
	tb.Helper()
	cmd := exec.Command(shell(tb), append([]string{"../scripts/install-agent.sh", "--root", root}, args...)...)
	cmd.Env = append(os.Environ(), "UNAME_M="+machine)
	out, err := cmd.CombinedOutput()
	if strings.Contains(string(out), "SECRETsecret") {
		tb.Errorf("install output shows the token:\n%s", out)
	}
	return installRun{out: string(out), err: err, root: root}
}

func mode(tb testing.TB, path string) os.FileMode {
	tb.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		tb.Fatal(err)
	}
	return st.Mode()
}

func TestInstallScript(t *testing.T) {
	dist := fakeDist(t)
	root := filepath.Join(t.TempDir(), "root")
	r := runInstall(t, root, "armv6l", "--dist", dist, "--server", "https://fleet.example:8443", "--token", testToken, "--id", "pi-1")
	if r.err != nil {
		t.Fatalf("install: %v\n%s", r.err, r.out)
	}

	bin := filepath.Join(root, "usr/local/bin/device-agent")
	if b, _ := os.ReadFile(bin); !strings.Contains(string(b), "armv6") {
		t.Errorf("installed binary %q, want the armv6 one", b)
	}
	if m := mode(t, bin); m.Perm() != 0o755 {
		t.Errorf("binary mode %v", m)
	}
	unit := filepath.Join(root, "etc/systemd/system/device-agent.service")
	want, err := os.ReadFile("../scripts/device-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(unit); !bytes.Equal(got, want) {
		t.Error("installed unit differs from scripts/device-agent.service")
	}
	if m := mode(t, unit); m.Perm() != 0o644 {
		t.Errorf("unit mode %v", m)
	}
	if m := mode(t, filepath.Join(root, "var/lib/device-agent")); !m.IsDir() || m.Perm() != 0o700 {
		t.Errorf("state dir mode %v", m)
	}
	link := filepath.Join(root, "etc/systemd/system/multi-user.target.wants/device-agent.service")
	if target, err := os.Readlink(link); err != nil || target != "/etc/systemd/system/device-agent.service" {
		t.Errorf("enable link %q, %v", target, err)
	}
	for _, w := range []string{
		"would run: useradd --system",
		"would run: chown device-agent:device-agent",
		"would run as device-agent: /usr/local/bin/device-agent enroll --state-dir /var/lib/device-agent --server https://fleet.example:8443 --token - --id pi-1",
		"would run: systemctl daemon-reload",
		"would run: systemctl enable device-agent.service",
		"would run: systemctl restart device-agent.service",
		"nothing was run",
	} {
		if !strings.Contains(r.out, w) {
			t.Errorf("output lacks %q:\n%s", w, r.out)
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(bin))
	if len(entries) != 1 {
		t.Errorf("temp files left next to the binary: %v", entries)
	}

	// Idempotent: a second run succeeds and leaves the same tree.
	before := tree(t, root)
	if r := runInstall(t, root, "armv6l", "--dist", dist, "--server", "https://fleet.example:8443", "--token", testToken); r.err != nil {
		t.Fatalf("second install: %v\n%s", r.err, r.out)
	}
	if after := tree(t, root); !slices.Equal(before, after) {
		t.Errorf("second run changed the tree:\n%v\n%v", before, after)
	}

	// Once enrolled, an upgrade needs no token and does not enroll again.
	if err := os.WriteFile(filepath.Join(root, "var/lib/device-agent/cert.pem"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	r = runInstall(t, root, "armv6l", "--dist", dist)
	if r.err != nil || !strings.Contains(r.out, "already enrolled") || strings.Contains(r.out, " enroll --state-dir") {
		t.Errorf("upgrade of an enrolled device: %v\n%s", r.err, r.out)
	}
	// --force enrolls again.
	r = runInstall(t, root, "armv6l", "--dist", dist, "--server", "https://fleet.example:8443", "--token", testToken, "--force")
	if r.err != nil || !strings.Contains(r.out, "--token - --force") {
		t.Errorf("forced install: %v\n%s", r.err, r.out)
	}

	// Uninstall keeps the identity; --purge removes it.
	r = runInstall(t, root, "armv6l", "--uninstall")
	if r.err != nil {
		t.Fatalf("uninstall: %v\n%s", r.err, r.out)
	}
	for _, p := range []string{bin, unit, link} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("%s still there after uninstall", p)
		}
	}
	if !strings.Contains(r.out, "would run: systemctl disable --now device-agent.service") {
		t.Errorf("uninstall output:\n%s", r.out)
	}
	if _, err := os.Stat(filepath.Join(root, "var/lib/device-agent/cert.pem")); err != nil {
		t.Error("uninstall deleted the identity")
	}
	r = runInstall(t, root, "armv6l", "--uninstall", "--purge")
	if _, err := os.Stat(filepath.Join(root, "var/lib/device-agent")); r.err != nil || !os.IsNotExist(err) {
		t.Errorf("purge: %v, state dir: %v\n%s", r.err, err, r.out)
	}
}

// tree lists every path with its mode and content.
func tree(tb testing.TB, root string) []string {
	tb.Helper()
	var out []string
	err := filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		line := strings.TrimPrefix(p, root) + " " + info.Mode().String()
		if info.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			line += " " + string(b)
		}
		out = append(out, line)
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

func TestInstallScriptPicksArchitecture(t *testing.T) {
	dist := fakeDist(t)
	for machine, arch := range map[string]string{"armv6l": "armv6", "armv7l": "armv7", "aarch64": "arm64", "x86_64": "amd64"} {
		t.Run(machine, func(t *testing.T) {
			root := t.TempDir()
			r := runInstall(t, root, machine, "--dist", dist, "--server", "https://s:8443", "--token", testToken)
			if r.err != nil {
				t.Fatalf("%v\n%s", r.err, r.out)
			}
			if b, _ := os.ReadFile(filepath.Join(root, "usr/local/bin/device-agent")); !strings.Contains(string(b), arch) {
				t.Errorf("installed %q, want %s", b, arch)
			}
		})
	}
	root := t.TempDir()
	if r := runInstall(t, root, "mips", "--dist", dist, "--server", "https://s:8443", "--token", testToken); r.err == nil || !strings.Contains(r.out, "unsupported machine mips") {
		t.Errorf("mips: %v\n%s", r.err, r.out)
	}
	if _, err := os.Stat(filepath.Join(root, "usr/local/bin/device-agent")); !os.IsNotExist(err) {
		t.Error("a binary was installed for an unsupported machine")
	}
}

func TestInstallScriptRefusals(t *testing.T) {
	dist := fakeDist(t)
	cases := map[string][]string{
		"no token":       {"--dist", dist, "--server", "https://s:8443"},
		"no server":      {"--dist", dist, "--token", testToken},
		"missing binary": {"--binary", filepath.Join(dist, "nope"), "--server", "https://s:8443", "--token", testToken},
		"unknown option": {"--dist", dist, "--colour"},
		"dangling value": {"--dist", dist, "--server"},
	}
	for name, args := range cases {
		t.Run(name, func(t *testing.T) {
			if r := runInstall(t, t.TempDir(), "x86_64", args...); r.err == nil {
				t.Errorf("succeeded:\n%s", r.out)
			}
		})
	}
	// --binary and the token from stdin.
	root := t.TempDir()
	cmd := exec.Command(shell(t), "../scripts/install-agent.sh", "--root", root, "--binary", filepath.Join(dist, "device-agent-linux-arm64"),
		"--server", "https://s:8443", "--token", "-")
	cmd.Env = append(os.Environ(), "UNAME_M=x86_64")
	cmd.Stdin = strings.NewReader(testToken + "\n")
	if out, err := cmd.CombinedOutput(); err != nil || strings.Contains(string(out), "SECRETsecret") {
		t.Errorf("--binary with token on stdin: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "usr/local/bin/device-agent")); !strings.Contains(string(b), "arm64") {
		t.Errorf("--binary not used: %q", b)
	}
}

// On a system without systemd the script refuses before it installs
// anything: a binary and unit nobody can start are half an install.
func TestInstallScriptNeedsSystemd(t *testing.T) {
	// PATH holds every command this machine has except systemctl.
	bin := t.TempDir()
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if e.Name() == "systemctl" {
				continue
			}
			_ = os.Symlink(filepath.Join(dir, e.Name()), filepath.Join(bin, e.Name())) // first one on PATH wins
		}
	}
	root := t.TempDir()
	cmd := exec.Command(shell(t), "../scripts/install-agent.sh", "--root", root, "--dist", fakeDist(t),
		"--server", "https://s:8443", "--token", testToken)
	cmd.Env = append(os.Environ(), "UNAME_M=x86_64", "RUN_SYSTEM_COMMANDS=1", "PATH="+bin)
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "systemd is needed (systemctl not found); nothing done") {
		t.Fatalf("install without systemctl: %v\n%s", err, out)
	}
	entries, _ := os.ReadDir(root)
	if len(entries) != 0 {
		t.Errorf("%d entries installed under the root, want none", len(entries))
	}
}

// Where systemctl exists but systemd is not running (a container, a
// chroot), every systemctl call would fail: the script refuses before it
// installs or removes anything.
func TestInstallScriptNeedsRunningSystemd(t *testing.T) {
	dist := fakeDist(t)
	for _, args := range [][]string{
		{"--dist", dist, "--server", "https://s:8443", "--token", testToken},
		{"--uninstall"},
	} {
		fs := newFakeSystem(t, false, false, 0)
		root := t.TempDir()
		r := fs.runBare(t, root, "", args...)
		if r.err == nil || !strings.Contains(r.out, "systemd is not running here") || !strings.Contains(r.out, "nothing done") {
			t.Fatalf("%v without a running systemd: %v\n%s", args, r.err, r.out)
		}
		if entries, _ := os.ReadDir(root); len(entries) != 0 {
			t.Errorf("%v: %d entries installed under the root, want none", args, len(entries))
		}
		if calls := fs.calls(t); len(calls) != 1 || calls[0] != "" {
			t.Errorf("%v: system commands run: %q", args, calls)
		}
	}
}

// unitDirectives parses a unit file into section.Key → values.
func unitDirectives(tb testing.TB, path string) map[string][]string {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	out := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				tb.Fatalf("bad unit line %q", line)
			}
			out[section+"."+k] = append(out[section+"."+k], v)
		}
	}
	return out
}

func TestUnitDirectives(t *testing.T) {
	d := unitDirectives(t, "../scripts/device-agent.service")
	exact := map[string]string{
		"Service.User":               "device-agent",
		"Service.Group":              "device-agent",
		"Service.ExecStart":          "/usr/local/bin/device-agent run",
		"Service.StateDirectory":     "device-agent",
		"Service.StateDirectoryMode": "0700",
		"Service.ProtectSystem":      "strict",
		"Service.ProtectHome":        "true",
		"Service.PrivateTmp":         "true",
		"Service.NoNewPrivileges":    "true",
		"Service.Restart":            "always",
		"Service.RestartSec":         "10",
		"Install.WantedBy":           "multi-user.target",
	}
	for k, v := range exact {
		if got := d[k]; len(got) != 1 || got[0] != v {
			t.Errorf("%s = %v, want %q", k, got, v)
		}
	}
	for _, k := range []string{"Unit.After", "Unit.Wants"} {
		deps := strings.Fields(strings.Join(d[k], " "))
		for _, w := range []string{"network-online.target", "time-sync.target"} {
			if !slices.Contains(deps, w) {
				t.Errorf("%s lacks %s", k, w)
			}
		}
	}
	// Hardening that would break telemetry must not creep in: ProcSubset=pid
	// hides /proc/loadavg and /proc/meminfo, PrivateNetwork cuts the broker.
	for _, k := range []string{"Service.ProcSubset", "Service.PrivateNetwork", "Service.DynamicUser"} {
		if v, ok := d[k]; ok {
			t.Errorf("%s=%v breaks the agent", k, v)
		}
	}
}

// TestUnitVerifies runs systemd-analyze verify on the unit as installed by
// the script into a root that has the system's units and the binary.
func TestUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	root := t.TempDir()
	if r := runInstall(t, root, "x86_64", "--dist", fakeDist(t), "--server", "https://s:8443", "--token", testToken); r.err != nil {
		t.Fatalf("install: %v\n%s", r.err, r.out)
	}
	// verify resolves dependencies (sysinit.target, ...) inside the root.
	if err := os.MkdirAll(filepath.Join(root, "usr/lib/systemd"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", "/usr/lib/systemd/system", filepath.Join(root, "usr/lib/systemd/")).CombinedOutput(); err != nil {
		t.Skipf("no system units to verify against: %v %s", err, out)
	}
	cmd := exec.Command(analyze, "verify", "--man=no", "--root="+root, "/etc/systemd/system/device-agent.service")
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Run(); err != nil || stderr.Len() > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, stderr.String())
	}
}

// fakeSystem is a folder of fake system commands (systemctl, runuser,
// useradd, chown, userdel) for running install-agent.sh with
// RUN_SYSTEM_COMMANDS=1 inside a --root: each logs its command line to
// log; runuser saves its stdin (the token) and exits with enrollExit;
// systemctl is-active and is-enabled answer as told.
type fakeSystem struct {
	bin, log, stdin string
}

func newFakeSystem(tb testing.TB, active, enabled bool, enrollExit int) fakeSystem {
	tb.Helper()
	dir := tb.TempDir()
	fs := fakeSystem{bin: filepath.Join(dir, "bin"), log: filepath.Join(dir, "log"), stdin: filepath.Join(dir, "stdin")}
	if err := os.Mkdir(fs.bin, 0o755); err != nil {
		tb.Fatal(err)
	}
	code := func(ok bool) string {
		if ok {
			return "0"
		}
		return "3"
	}
	scripts := map[string]string{
		"systemctl": `case "$1" in is-active) exit ` + code(active) + ` ;; is-enabled) exit ` + code(enabled) + ` ;; esac`,
		"runuser":   `cat > '` + fs.stdin + `'; exit ` + strconv.Itoa(enrollExit),
		"useradd":   "",
		"chown":     "",
		"userdel":   "",
	}
	for name, body := range scripts {
		sh := "#!/bin/sh\necho \"" + name + " $*\" >> '" + fs.log + "'\n" + body + "\n"
		if err := os.WriteFile(filepath.Join(fs.bin, name), []byte(sh), 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	return fs
}

// run runs the install script inside root with the fake system commands,
// systemd marked as running there.
func (fs fakeSystem) run(tb testing.TB, root, stdin string, args ...string) installRun {
	tb.Helper()
	if err := os.MkdirAll(filepath.Join(root, "run/systemd/system"), 0o755); err != nil {
		tb.Fatal(err)
	}
	return fs.runBare(tb, root, stdin, args...)
}

// runBare is run without marking systemd as running in root.
func (fs fakeSystem) runBare(tb testing.TB, root, stdin string, args ...string) installRun {
	tb.Helper()
	cmd := exec.Command(shell(tb), append([]string{"../scripts/install-agent.sh", "--root", root}, args...)...)
	cmd.Env = append(os.Environ(), "UNAME_M=x86_64", "RUN_SYSTEM_COMMANDS=1", "PATH="+fs.bin+":"+os.Getenv("PATH"))
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return installRun{out: string(out), err: err, root: root}
}

func (fs fakeSystem) calls(tb testing.TB) []string {
	tb.Helper()
	b, err := os.ReadFile(fs.log)
	if err != nil && !os.IsNotExist(err) {
		tb.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// enrolledRoot is a root in which the device is enrolled.
func enrolledRoot(tb testing.TB) string {
	tb.Helper()
	root := tb.TempDir()
	state := filepath.Join(root, "var/lib/device-agent")
	if err := os.MkdirAll(state, 0o700); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, "cert.pem"), []byte("x"), 0o644); err != nil {
		tb.Fatal(err)
	}
	return root
}

// --force stops the service to enroll again; a refused token must not
// leave a working device offline.
func TestInstallScriptForceFailureRestartsService(t *testing.T) {
	dist := fakeDist(t)
	args := []string{"--dist", dist, "--server", "https://s:8443", "--token", "-", "--force"}
	for _, c := range []struct {
		name            string
		active, enabled bool
		restart         bool
	}{
		{"running", true, true, true},
		{"enabled, stopped", false, true, true},
		{"not installed as a service", false, false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := newFakeSystem(t, c.active, c.enabled, 1)
			r := fs.run(t, enrolledRoot(t), testToken+"\n", args...)
			if r.err == nil {
				t.Fatalf("succeeded although enrollment failed:\n%s", r.out)
			}
			calls := strings.Join(fs.calls(t), "\n")
			stop := strings.Index(calls, "systemctl stop device-agent.service")
			enroll := strings.Index(calls, "runuser -u device-agent -- /usr/local/bin/device-agent enroll")
			start := strings.Index(calls, "systemctl start device-agent.service")
			if stop < 0 || enroll < stop {
				t.Fatalf("want stop, then enroll:\n%s", calls)
			}
			if c.restart != (start > enroll) || c.restart != strings.Contains(r.out, "started again") {
				t.Errorf("service started again: %v, want %v\ncalls:\n%s\noutput:\n%s", start > enroll, c.restart, calls, r.out)
			}
			if !strings.Contains(r.out, "enrollment failed") {
				t.Errorf("output does not say the enrollment failed:\n%s", r.out)
			}
			if strings.Contains(calls, "systemctl enable") || strings.Contains(calls, "systemctl restart") {
				t.Errorf("went on after the failure:\n%s", calls)
			}
		})
	}
	// And on success: stop, enroll with the token on stdin, enable, restart.
	fs := newFakeSystem(t, true, true, 0)
	r := fs.run(t, enrolledRoot(t), testToken+"\n", args...)
	if r.err != nil {
		t.Fatalf("forced install: %v\n%s", r.err, r.out)
	}
	if b, _ := os.ReadFile(fs.stdin); strings.TrimSpace(string(b)) != testToken {
		t.Errorf("enroll got %q on stdin, want the token", b)
	}
	calls := strings.Join(fs.calls(t), "\n")
	if i, j := strings.Index(calls, "runuser"), strings.Index(calls, "systemctl restart device-agent.service"); i < 0 || j < i || strings.Contains(calls, "systemctl start") {
		t.Errorf("calls:\n%s", calls)
	}
}

// The README's upgrade command, re-run on an enrolled device with nothing
// on stdin, upgrades without asking for a token.
func TestInstallScriptUpgradeIgnoresTokenStdin(t *testing.T) {
	dist := fakeDist(t)
	root := enrolledRoot(t)
	cmd := exec.Command(shell(t), "../scripts/install-agent.sh", "--root", root, "--dist", dist, "--server", "https://s:8443", "--token", "-")
	cmd.Env = append(os.Environ(), "UNAME_M=x86_64")
	cmd.Stdin = strings.NewReader("")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "already enrolled") || strings.Contains(string(out), " enroll --state-dir") {
		t.Errorf("upgrade with --token - and empty stdin: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "usr/local/bin/device-agent")); !strings.Contains(string(b), "amd64") {
		t.Errorf("binary not upgraded: %q", b)
	}

	// Enrolling does need it, and an empty one is named as such.
	cmd = exec.Command(shell(t), "../scripts/install-agent.sh", "--root", t.TempDir(), "--dist", dist, "--server", "https://s:8443", "--token", "-")
	cmd.Env = append(os.Environ(), "UNAME_M=x86_64")
	cmd.Stdin = strings.NewReader("\n")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "the token read from stdin is empty") {
		t.Errorf("empty token on stdin: %v\n%s", err, out)
	}
}

func TestInstallScriptPurgeNeedsUninstall(t *testing.T) {
	root := enrolledRoot(t)
	r := runInstall(t, root, "x86_64", "--dist", fakeDist(t), "--purge")
	if r.err == nil || !strings.Contains(r.out, "--purge only goes with --uninstall") {
		t.Errorf("--purge alone: %v\n%s", r.err, r.out)
	}
	if _, err := os.Stat(filepath.Join(root, "usr/local/bin/device-agent")); !os.IsNotExist(err) {
		t.Error("--purge alone went on to install")
	}
	if _, err := os.Stat(filepath.Join(root, "var/lib/device-agent/cert.pem")); err != nil {
		t.Error("--purge alone deleted the identity")
	}
}

// The token goes through stdin, never on a command line: the script's own
// examples must not show otherwise.
func TestInstallScriptExamplesKeepTokenOffCommandLine(t *testing.T) {
	b, err := os.ReadFile("../scripts/install-agent.sh")
	if err != nil {
		t.Fatal(err)
	}
	for i, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "#") && strings.Contains(line, "--token") && !strings.Contains(line, "--token -") {
			t.Errorf("line %d shows a token on the command line: %s", i+1, line)
		}
	}
}
