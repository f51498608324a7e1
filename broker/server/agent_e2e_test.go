package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetmq/fleetmq/broker"
	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/broker/server"
)

// TestAgentEndToEnd runs the real device-agent binary, built once for each
// architecture, as a child process against a real node on loopback: the
// amd64 build natively, the armv7 and arm64 builds under qemu-user. The
// subtests run in parallel; most of their time is spent waiting.
func TestAgentEndToEnd(t *testing.T) {
	builds := newAgentBuilds(t)
	t.Run("TelemetryAndCommands", func(t *testing.T) {
		t.Parallel()
		testAgentTelemetryAndCommands(t, builds.get(t, "amd64"))
	})
	t.Run("ScheduledRenewal", func(t *testing.T) {
		t.Parallel()
		testAgentScheduledRenewal(t, builds.get(t, "amd64"))
	})
	t.Run("BrokerOutage", func(t *testing.T) {
		t.Parallel()
		testAgentBrokerOutage(t, builds.get(t, "amd64"))
	})
	t.Run("Revoked", func(t *testing.T) {
		t.Parallel()
		testAgentRevoked(t, builds.get(t, "amd64"))
	})
	t.Run("FullDisk", func(t *testing.T) {
		t.Parallel()
		testAgentFullDisk(t, builds.get(t, "amd64"))
	})
	t.Run("ServerRestoredFromOlderBackup", func(t *testing.T) {
		t.Parallel()
		testAgentServerRestored(t, builds.get(t, "amd64"))
	})
	t.Run("LostEnrollAnswer", func(t *testing.T) {
		t.Parallel()
		testAgentLostEnrollAnswer(t, builds.get(t, "amd64"))
	})
	for _, arch := range []string{"armv7", "arm64"} {
		t.Run("Qemu_"+arch, func(t *testing.T) {
			if testing.Short() {
				t.Skip("cross-builds and emulates the agent; skipped with -short")
			}
			t.Parallel()
			testAgentUnderQemu(t, builds.get(t, arch))
		})
	}
}

// testAgentLostEnrollAnswer: the answer to an enrollment is lost after the
// server committed it (QA on a lossy link: the token was gone and the
// device had no certificate). The agent tries again by itself with the same
// key and the used-up token, and gets the certificate issued the first
// time; nothing else is issued.
func testAgentLostEnrollAnswer(t *testing.T, bin agentBinary) {
	s := startServer(t)
	tok := s.token(t, "--device", "pi-lost")
	proxy := dropAnswer(t, s)
	dir := filepath.Join(t.TempDir(), "state")
	out, errs, code := bin.exec(t, tok+"\n", "enroll", "--server", "https://"+proxy, "--token", "-", "--state-dir", dir)
	if code != 0 || !strings.HasPrefix(out, "enrolled as pi-lost") || !strings.Contains(errs, "trying again") {
		t.Fatalf("enroll through a link that lost the first answer: exit %d\n%s%s", code, out, errs)
	}
	issued := s.deviceInfo(t, "pi-lost").Serial
	if st := bin.status(t, dir); st.Serial != issued {
		t.Errorf("the device holds serial %s, want the one issued, %s", st.Serial, issued)
	}
	if _, err := os.Stat(filepath.Join(dir, "enroll-key.pem")); !os.IsNotExist(err) {
		t.Errorf("the pending enrollment key is left in the state folder: %v", err)
	}
	audit, _, _ := s.cli(t, "audit", "--device", "pi-lost")
	if strings.Count(audit, "cert.issue") != 1 || !strings.Contains(audit, "enroll.repeat") {
		t.Errorf("want one cert.issue and an enroll.repeat in the audit:\n%s", audit)
	}
}

// dropAnswer is an HTTPS proxy to s (with a server certificate of its CA)
// that passes the first POST /v1/enroll on and cuts the connection instead
// of answering, as a link losing the answer after the server committed
// does.
func dropAnswer(tb testing.TB, s *testServer) string {
	tb.Helper()
	cert, err := s.CA().IssueServer([]string{"127.0.0.1"}, time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	up := s.client(nil)
	var dropped atomic.Bool
	p := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, err := http.NewRequestWithContext(r.Context(), r.Method, s.url(r.URL.RequestURI()), r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		req.Header = r.Header.Clone()
		resp, err := up.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		if r.URL.Path == "/v1/enroll" && dropped.CompareAndSwap(false, true) {
			if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
				c.Close()
			}
			return
		}
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
	}))
	p.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	p.StartTLS()
	tb.Cleanup(p.Close)
	return p.Listener.Addr().String()
}

// realClock runs a node on the wall clock: the agent is another process on
// that clock, and certificates must expire when both think they do.
func realClock(c *server.Config) { c.Now = time.Now }

// testAgentTelemetryAndCommands: enrollment with a real token, telemetry
// visible through `fleetmq telemetry`, and the commands a backend sends.
func testAgentTelemetryAndCommands(t *testing.T, bin agentBinary) {
	s := startServer(t, realClock)
	const id = "pi-e2e-cmd"
	tok := s.token(t, "--device", id)
	dir := bin.enroll(t, s, tok)
	a := bin.start(t, dir, "--interval", "1s")

	var got []storedSample
	waitFor(t, a, 30*time.Second, "two telemetry messages stored", func() bool {
		got = s.agentSamples(t, id)
		return len(got) >= 2
	})
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(got[0].payload, &fields); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"time", "uptime_s", "load1", "load5", "load15", "mem_total_kb", "mem_available_kb", "disk_free_bytes", "agent_version"} {
		if _, ok := fields[k]; !ok {
			t.Errorf("telemetry lacks %q: %s", k, got[0].payload)
		}
	}
	if s0 := got[0].s; s0.AgentVersion != bin.version || s0.MemTotalKB == 0 || s0.UptimeS <= 0 {
		t.Errorf("telemetry from the agent: %s", got[0].payload)
	}

	st := waitStatus(t, bin, a, dir, "connected", func(st agentStatus) bool { return st.Connected })
	asked := time.Now()
	dev := s.deviceInfo(t, id)
	if st.DeviceID != id || st.Serial != dev.Serial || !st.Running {
		t.Fatalf("status %+v, store serial %s", st, dev.Serial)
	}
	// The presence record holds the connect time; a connected device is
	// seen at the moment it is asked about (this server's clock is real).
	if !dev.Online || dev.LastSeen.Before(asked) {
		t.Errorf("device show: online %v, last seen %v, asked at %v", dev.Online, dev.LastSeen, asked)
	}

	// A backend with a service certificate commands the device.
	svc := serviceClient(t, s, "backend")
	events := subscribe(t, svc, "devices/"+id+"/events/#")
	publish(t, svc, "devices/"+id+"/commands/ping", `{"probe":"e2e-1"}`)
	pong := nextMessage(t, events, 15*time.Second, "the pong")
	var answer struct {
		Time    string          `json:"time"`
		Request json.RawMessage `json:"request"`
	}
	if pong.Topic() != "devices/"+id+"/events/pong" || json.Unmarshal(pong.Payload(), &answer) != nil ||
		!jsonEqual(answer.Request, []byte(`{"probe":"e2e-1"}`)) || answer.Time == "" {
		t.Fatalf("ping answered on %s with %s", pong.Topic(), pong.Payload())
	}
	// Unknown commands are answered with an error event, never executed.
	publish(t, svc, "devices/"+id+"/commands/reboot", "now")
	refusal := nextMessage(t, events, 15*time.Second, "the error event")
	var cerr struct{ Command, Code string }
	if refusal.Topic() != "devices/"+id+"/events/error" || json.Unmarshal(refusal.Payload(), &cerr) != nil ||
		cerr.Command != "reboot" || cerr.Code != "unknown_command" {
		t.Fatalf("unknown command answered on %s with %s", refusal.Topic(), refusal.Payload())
	}

	// The operator's way, without a service certificate: the CLI sends
	// the ping and prints the agent's pong.
	out, errs, code := s.cli(t, "device", "command", id, "ping", `{"probe":"cli-1"}`, "--wait", "15s", "--json")
	var sent admin.CommandResult
	answer.Request = nil
	if code != 0 || json.Unmarshal([]byte(out), &sent) != nil || sent.Reply == nil ||
		sent.Reply.Topic != "devices/"+id+"/events/pong" || json.Unmarshal(sent.Reply.Payload, &answer) != nil ||
		!jsonEqual(answer.Request, []byte(`{"probe":"cli-1"}`)) {
		t.Fatalf("fleetmq device command ping: exit %d: %s%s", code, out, errs)
	}

	// The renew command: a new certificate, and the running process goes
	// on over a new MQTT session.
	before := s.Broker().Stats().SessionsTotal
	requested := time.Now()
	publish(t, svc, "devices/"+id+"/commands/renew", "")
	var renewed admin.DeviceInfo
	waitFor(t, a, 30*time.Second, "renewal by command", func() bool {
		renewed = s.deviceInfo(t, id)
		return renewed.Serial != dev.Serial
	})
	if renewed.LastRenewal.Before(requested) || !renewed.NotAfter.After(dev.NotAfter) {
		t.Errorf("renewal record: last renewal %s (requested %s), not after %s → %s", renewed.LastRenewal, requested, dev.NotAfter, renewed.NotAfter)
	}
	waitFor(t, a, 30*time.Second, "telemetry after the renewal on a new session", func() bool {
		smp := s.agentSamples(t, id)
		return s.Broker().Stats().SessionsTotal > before && s.deviceInfo(t, id).Online &&
			smp[len(smp)-1].at.After(renewed.LastRenewal)
	})
	st = waitStatus(t, bin, a, dir, "status with the new certificate", func(st agentStatus) bool {
		return st.Connected && st.Serial == renewed.Serial
	})
	if st.LastRenewal.IsZero() || !st.Running {
		t.Errorf("status after renewal: %+v", st)
	}

	// The token was used and must not show up anywhere the agent writes to.
	if logs := a.logs.String(); strings.Contains(logs, tok) || strings.Contains(logs, "PRIVATE KEY") {
		t.Error("agent log contains the token or a key")
	}
}

// testAgentScheduledRenewal: with 20-second certificates the agent renews
// on its own at two thirds of the lifetime, and its MQTT session continues
// on the new certificate past the expiry of the first one. A session still
// on the old certificate would be closed by the broker at its NotAfter, and
// the old certificate refused at the next handshake.
func testAgentScheduledRenewal(t *testing.T, bin agentBinary) {
	const lifetime = 20 * time.Second
	s := startServer(t, realClock, func(c *server.Config) { c.CertLifetime = lifetime })
	const id = "pi-e2e-sched"
	dir := bin.enroll(t, s, s.token(t, "--device", id))
	first := s.deviceInfo(t, id)
	if life := time.Until(first.NotAfter); life > lifetime || life < lifetime/2 {
		t.Fatalf("first certificate expires in %s, want about %s", life, lifetime)
	}
	a := bin.start(t, dir, "--interval", "1s")

	var smp []storedSample
	waitFor(t, a, 2*lifetime+30*time.Second, "telemetry past the first certificate's expiry", func() bool {
		smp = s.agentSamples(t, id)
		return len(smp) > 0 && smp[len(smp)-1].at.After(first.NotAfter.Add(2*time.Second)) && s.deviceInfo(t, id).Online
	})
	dev := s.deviceInfo(t, id)
	if dev.Serial == first.Serial || dev.LastRenewal.IsZero() || !dev.NotAfter.After(first.NotAfter) {
		t.Fatalf("no renewal recorded: first %s until %s, now %s until %s", first.Serial, first.NotAfter, dev.Serial, dev.NotAfter)
	}
	stats := s.Broker().Stats()
	if n := stats.Kicked[broker.KickCertExpired]; n != 0 {
		t.Errorf("%d sessions closed at certificate expiry: the agent kept an old certificate", n)
	}
	if n := stats.HandshakeFailures[broker.ReasonCertExpired]; n != 0 {
		t.Errorf("%d handshakes with an expired certificate", n)
	}
	if stats.SessionsTotal < 2 {
		t.Errorf("%d sessions: the agent did not reconnect with its new certificate", stats.SessionsTotal)
	}
	// Nothing was lost across the reconnections.
	checkSequence(t, smp, time.Second)
	st := waitStatus(t, bin, a, dir, "status with a renewed certificate", func(st agentStatus) bool {
		return st.Connected && st.Serial != first.Serial
	})
	if st.LastRenewal.IsZero() || !st.NotAfter.After(first.NotAfter) {
		t.Errorf("status after scheduled renewal: %+v", st)
	}
}

// testAgentBrokerOutage: the node stops, the agent buffers, the node comes
// back on the same ports and data folder, and the buffered telemetry
// arrives in order, complete, matching the agent's own queue counters.
func testAgentBrokerOutage(t *testing.T, bin agentBinary) {
	const interval = time.Second
	s := startServer(t, realClock)
	// Read before Close: the restarted node must listen exactly here, the
	// agent keeps the broker URL it enrolled with.
	enrollAddr, mqttAddr := s.EnrollAddr().String(), s.MQTTAddr().String()
	const id = "pi-e2e-outage"
	dir := bin.enroll(t, s, s.token(t, "--device", id))
	a := bin.start(t, dir, "--interval", interval.String())
	waitFor(t, a, 30*time.Second, "telemetry flowing", func() bool { return len(s.agentSamples(t, id)) >= 3 })

	closedAt := time.Now()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	st := waitStatus(t, bin, a, dir, "samples buffered while the broker is down", func(st agentStatus) bool {
		return !st.Connected && st.QueuePending >= 3
	})
	t.Logf("%d samples pending while the broker is down", st.QueuePending)

	restartedAt := time.Now()
	s2 := restartServer(t, s, enrollAddr, mqttAddr)
	var smp []storedSample
	st = waitStatus(t, bin, a, dir, "reconnected and the backlog delivered", func(st agentStatus) bool {
		if !st.Connected || !st.Since.After(restartedAt) {
			return false
		}
		// The queue is delivered in order: a sample taken after the
		// reconnection being stored means the backlog was.
		smp = s2.agentSamples(t, id)
		return len(smp) > 0 && smp[len(smp)-1].at.After(st.Since)
	})

	distinct, resent := checkSequence(t, smp, interval)
	t.Logf("%d samples stored, %d of them again after the restart", len(distinct), len(resent))
	var during int
	for _, x := range distinct {
		if x.at.After(closedAt) && x.at.Before(restartedAt) {
			during++
			if x.received.Before(restartedAt) {
				t.Errorf("sample of %s stored at %s, while the node was down", x.at, x.received)
			}
		}
	}
	if during < 3 {
		t.Errorf("%d samples from the outage stored, want at least 3", during)
	}
	// At-least-once: a sample committed while the node stopped may have
	// lost its PUBACK and come again, but only then.
	for _, r := range resent {
		if r.received.Before(restartedAt) || !r.first.received.Before(closedAt.Add(5*time.Second)) {
			t.Errorf("sample of %s stored twice, at %s and %s", r.at, r.first.received, r.received)
		}
	}
	// The agent's counters: what it held when it reconnected is what the
	// node received after its return, up to that moment (plus at most one
	// sample taken while the counters were being saved) — unless they were
	// saved again once the backlog drained, when at most a sample taken
	// meanwhile is pending.
	var backlog int
	for _, x := range smp {
		if x.received.After(restartedAt) && !x.at.After(st.Since) {
			backlog++
		}
	}
	drainedSave := st.QueueCounted.Sub(st.Since) > 10*time.Millisecond // the save at connection is the same moment
	switch {
	case drainedSave && st.QueuePending > 1:
		t.Errorf("agent reported %d pending after delivering its backlog of %d", st.QueuePending, backlog)
	case !drainedSave && (backlog < st.QueuePending || backlog > st.QueuePending+1):
		t.Errorf("agent reported %d pending at reconnection, node received %d of them", st.QueuePending, backlog)
	}
	if st.QueueDropped != 0 {
		t.Errorf("%d samples dropped", st.QueueDropped)
	}

	// SIGTERM: a clean stop, and status says so.
	a.stop(t)
	if st := bin.status(t, dir); st.Running || st.Connected {
		t.Errorf("status after stop: %+v", st)
	}
}

// testAgentFullDisk: with its state folder unwritable (the file size limit
// of the running agent set to 0 with prlimit: every write fails as on a full
// SD card, as TestDiskFullNode does for the node) a connected agent keeps
// publishing, from memory, and says why; once space is back it writes to
// disk again without a restart.
func testAgentFullDisk(t *testing.T, bin agentBinary) {
	prlimit := prlimitPath(t)
	s := startServer(t, realClock)
	const id = "pi-e2e-full"
	dir := bin.enroll(t, s, s.token(t, "--device", id))
	a := bin.start(t, dir, "--interval", "1s")
	waitFor(t, a, 30*time.Second, "telemetry flowing", func() bool { return len(s.agentSamples(t, id)) >= 2 })

	limit := func(fsize string) {
		t.Helper()
		pid := strconv.Itoa(a.cmd.Process.Pid)
		if out, err := exec.Command(prlimit, "--pid", pid, "--fsize="+fsize).CombinedOutput(); err != nil {
			t.Fatalf("prlimit --fsize=%s: %v: %s", fsize, err, out)
		}
	}
	limit("0:unlimited")
	full := time.Now()
	waitFor(t, a, 30*time.Second, "telemetry sampled on a full disk stored", func() bool {
		n := 0
		for _, x := range s.agentSamples(t, id) {
			if x.at.After(full.Add(time.Second)) {
				n++
			}
		}
		return n >= 3
	})
	if !strings.Contains(a.logs.String(), "holding telemetry in memory") {
		t.Errorf("agent log does not say the disk is full:\n%s", a.logs.String())
	}

	limit("unlimited")
	waitFor(t, a, 30*time.Second, "the agent writing to disk again", func() bool {
		return strings.Contains(a.logs.String(), "writing to disk again")
	})
	freed := time.Now()
	waitFor(t, a, 30*time.Second, "telemetry after space was freed", func() bool {
		smp := s.agentSamples(t, id)
		return len(smp) > 0 && smp[len(smp)-1].at.After(freed)
	})
	checkSequence(t, s.agentSamples(t, id), time.Second)
	a.stop(t)
}

// testAgentRevoked: a revoked device is refused, learns why from the
// enrollment server, reports it in status and stops trying for hours.
func testAgentRevoked(t *testing.T, bin agentBinary) {
	s := startServer(t, realClock)
	const id = "pi-e2e-revoked"
	dir := bin.enroll(t, s, s.token(t, "--device", id))
	a := bin.start(t, dir, "--interval", "1s")
	waitStatus(t, bin, a, dir, "connected", func(st agentStatus) bool { return st.Connected })

	if _, errs, code := s.cli(t, "device", "revoke", id); code != 0 {
		t.Fatalf("device revoke: %s", errs)
	}
	st := waitStatus(t, bin, a, dir, "status reporting the revocation", func(st agentStatus) bool {
		return st.Condition == "revoked"
	})
	if st.Connected || !st.Running || !strings.Contains(st.LastError, "revoked") {
		t.Errorf("status after revocation: %+v", st)
	}
	out, _, code := bin.exec(t, "", "status", "--state-dir", dir)
	if code != 0 || !strings.Contains(out, "enroll under a new id with a new token") {
		t.Errorf("status text after revocation (exit %d):\n%s", code, out)
	}

	// Backing off: without the block, the next attempt would come within
	// two seconds (connection backoff), the one after within four more.
	accepted := s.Broker().Stats().Accepted
	watch := time.NewTimer(6 * time.Second)
	defer watch.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-watch.C:
			done = true
		case <-a.done:
			t.Fatalf("agent exited after revocation: %v", a.err)
		case <-tick.C:
			if n := s.Broker().Stats().Accepted; n != accepted {
				t.Fatalf("agent connected to the broker %d more times after learning it is revoked", n-accepted)
			}
		}
	}
}

// testAgentServerRestored: the node is restored from a backup. A device
// that only renewed its certificate after the backup is refused by the
// broker, renews, is taken back and connects, by itself. A device enrolled
// after the backup is unknown: the agent says what to do and stops trying.
func testAgentServerRestored(t *testing.T, bin agentBinary) {
	s := startServer(t, realClock)
	enrollAddr, mqttAddr := s.EnrollAddr().String(), s.MQTTAddr().String()
	renewed := bin.enroll(t, s, s.token(t, "--device", "pi-e2e-renewed"))
	backup := filepath.Join(t.TempDir(), "backup")
	if _, errs, code := s.cli(t, "backup", backup); code != 0 {
		t.Fatalf("backup: %s", errs)
	}
	if out, errs, code := bin.exec(t, "", "renew", "--state-dir", renewed); code != 0 {
		t.Fatalf("renew after the backup: exit %d\n%s%s", code, out, errs)
	}
	const id = "pi-e2e-restored"
	dir := bin.enroll(t, s, s.token(t, "--device", id))
	a := bin.start(t, dir, "--interval", "1s")
	waitStatus(t, bin, a, dir, "connected", func(st agentStatus) bool { return st.Connected })

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s.cfg.DataDir = backup
	r := restartServer(t, s, enrollAddr, mqttAddr)

	b := bin.start(t, renewed, "--interval", "1s")
	waitStatus(t, bin, b, renewed, "the device renewed after the backup connected", func(st agentStatus) bool { return st.Connected })
	if out, _, _ := r.cli(t, "audit", "--device", "pi-e2e-renewed"); !strings.Contains(out, "cert.adopt") {
		t.Errorf("no cert.adopt in the audit log:\n%s", out)
	}

	st := waitStatus(t, bin, a, dir, "status reporting the unknown certificate", func(st agentStatus) bool {
		return st.Condition == "cert_unknown"
	})
	if st.Connected || !strings.Contains(st.LastError, "cert_invalid") {
		t.Errorf("status after the restore: %+v", st)
	}
	out, _, code := bin.exec(t, "", "status", "--state-dir", dir)
	if code != 0 || !strings.Contains(out, "restored from a backup older than this device") {
		t.Errorf("status text after the restore (exit %d):\n%s", code, out)
	}
}

// testAgentUnderQemu: the ARM build enrolls and publishes telemetry that
// the node stores, emulated by qemu-user.
func testAgentUnderQemu(t *testing.T, bin agentBinary) {
	s := startServer(t, realClock)
	id := "pi-e2e-" + bin.arch
	dir := bin.enroll(t, s, s.token(t, "--device", id))
	a := bin.start(t, dir, "--interval", "1s")
	var smp []storedSample
	waitFor(t, a, 90*time.Second, "telemetry from the emulated agent", func() bool {
		smp = s.agentSamples(t, id)
		return len(smp) >= 2
	})
	for _, x := range smp {
		if x.s.AgentVersion != bin.version || x.s.MemTotalKB == 0 {
			t.Fatalf("telemetry not from the %s build: %s", bin.arch, x.payload)
		}
	}
	st := waitStatus(t, bin, a, dir, "connected", func(st agentStatus) bool { return st.Connected })
	if dev := s.deviceInfo(t, id); st.Serial != dev.Serial || !dev.Online {
		t.Errorf("status %+v, store %+v", st, dev)
	}
}

// agentArch is one build target of the agent.
type agentArch struct {
	goarch, goarm string
	qemu          string // emulator; empty to run natively
	machine       elf.Machine
}

var agentArches = map[string]agentArch{
	"amd64": {goarch: "amd64", machine: elf.EM_X86_64},
	"armv7": {goarch: "arm", goarm: "7", qemu: "qemu-arm-static", machine: elf.EM_ARM},
	"arm64": {goarch: "arm64", qemu: "qemu-aarch64-static", machine: elf.EM_AARCH64},
}

// agentBuilds builds each architecture's agent at most once for all
// subtests, on first use.
type agentBuilds struct {
	dir   string
	mu    sync.Mutex
	byArc map[string]*agentBuild
}

type agentBuild struct {
	once sync.Once
	bin  agentBinary
	err  error
}

func newAgentBuilds(tb testing.TB) *agentBuilds {
	return &agentBuilds{dir: tb.TempDir(), byArc: make(map[string]*agentBuild)}
}

func (b *agentBuilds) get(tb testing.TB, arch string) agentBinary {
	tb.Helper()
	target, ok := agentArches[arch]
	if !ok {
		tb.Fatalf("no agent target %q", arch)
	}
	var qemu string
	if target.qemu != "" {
		var err error
		if qemu, err = exec.LookPath(target.qemu); err != nil {
			tb.Fatalf("%s not found: install Debian's qemu-user-static (scripts/test.sh does): %v", target.qemu, err)
		}
	}
	b.mu.Lock()
	e := b.byArc[arch]
	if e == nil {
		e = &agentBuild{}
		b.byArc[arch] = e
	}
	b.mu.Unlock()
	e.once.Do(func() { e.bin, e.err = buildAgent(b.dir, arch, target) })
	if e.err != nil {
		tb.Fatal(e.err)
	}
	bin := e.bin
	bin.qemu = qemu
	return bin
}

// buildAgent builds the agent as scripts/build-agent.sh does, with a version
// naming the architecture so that stored telemetry tells which build sent it.
func buildAgent(dir, arch string, target agentArch) (agentBinary, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return agentBinary{}, fmt.Errorf("go command not found: %w", err)
	}
	out := filepath.Join(dir, "device-agent-"+arch)
	version := "e2e-" + arch
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-ldflags", "-s -w -X main.version="+version,
		"-o", out, "github.com/fleetmq/fleetmq/device-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+target.goarch, "GOARM="+target.goarm)
	if b, err := cmd.CombinedOutput(); err != nil {
		return agentBinary{}, fmt.Errorf("build device-agent for %s: %w\n%s", arch, err, b)
	}
	// A host binary would pass the emulated tests without emulating anything.
	f, err := elf.Open(out)
	if err != nil {
		return agentBinary{}, err
	}
	defer f.Close()
	if f.Machine != target.machine {
		return agentBinary{}, fmt.Errorf("device-agent for %s is built for %s", arch, f.Machine)
	}
	return agentBinary{path: out, arch: arch, version: version}, nil
}

// agentBinary is one build of device-agent.
type agentBinary struct {
	path, arch, version string
	qemu                string // emulator path, empty to run natively
}

func (b agentBinary) command(ctx context.Context, args ...string) *exec.Cmd {
	if b.qemu == "" {
		return exec.CommandContext(ctx, b.path, args...)
	}
	return exec.CommandContext(ctx, b.qemu, append([]string{b.path}, args...)...)
}

// exec runs a short agent command and returns its stdout, stderr and exit code.
func (b agentBinary) exec(tb testing.TB, stdin string, args ...string) (stdout, stderr string, code int) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := b.command(ctx, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		tb.Fatalf("device-agent %s (%s): timed out\n%s", args[0], b.arch, errb.String())
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		tb.Fatalf("device-agent %s (%s): %v", args[0], b.arch, err)
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// enroll enrolls a fresh state folder with tok, read from stdin as the
// install script passes it, and returns the folder.
func (b agentBinary) enroll(tb testing.TB, s *testServer, tok string) string {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "state")
	out, errs, code := b.exec(tb, tok+"\n", "enroll", "--server", s.url(""), "--token", "-", "--state-dir", dir)
	if code != 0 || !strings.HasPrefix(out, "enrolled as ") {
		tb.Fatalf("device-agent enroll (%s): exit %d\n%s%s", b.arch, code, out, errs)
	}
	return dir
}

// agentStatus is `device-agent status --json`.
type agentStatus struct {
	DeviceID     string    `json:"device_id"`
	Serial       string    `json:"serial"`
	NotAfter     time.Time `json:"not_after"`
	LastRenewal  time.Time `json:"last_renewal"`
	Running      bool      `json:"running"`
	Connected    bool      `json:"connected"`
	Since        time.Time `json:"since"`
	Condition    string    `json:"condition"`
	LastError    string    `json:"last_error"`
	QueuePending int       `json:"queue_pending"`
	QueueCounted time.Time `json:"queue_counted"`
	QueueDropped uint64    `json:"queue_dropped"`
}

func (b agentBinary) status(tb testing.TB, dir string) agentStatus {
	tb.Helper()
	out, errs, code := b.exec(tb, "", "status", "--json", "--state-dir", dir)
	var st agentStatus
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
		tb.Fatalf("device-agent status --json (%s): exit %d\n%s%s", b.arch, code, out, errs)
	}
	return st
}

// waitStatus polls `device-agent status --json` until cond holds.
func waitStatus(tb testing.TB, b agentBinary, a *runningAgent, dir, what string, cond func(agentStatus) bool) agentStatus {
	tb.Helper()
	var st agentStatus
	waitFor(tb, a, 60*time.Second, what, func() bool {
		st = b.status(tb, dir)
		return cond(st)
	})
	return st
}

// runningAgent is a `device-agent run` child process.
type runningAgent struct {
	cmd    *exec.Cmd
	cancel context.CancelFunc
	logs   *syncBuffer
	done   chan struct{} // closed when it exited; err is set then
	err    error
}

// start runs the agent on dir, bounded in time. It is stopped with SIGTERM
// (then killed) at the end of the test, whose failure shows its log.
func (b agentBinary) start(tb testing.TB, dir string, args ...string) *runningAgent {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	a := &runningAgent{cancel: cancel, logs: &syncBuffer{}, done: make(chan struct{})}
	a.cmd = b.command(ctx, append([]string{"run", "--state-dir", dir, "--log-level", "debug"}, args...)...)
	a.cmd.Stdout, a.cmd.Stderr = a.logs, a.logs
	a.cmd.Cancel = func() error { return a.cmd.Process.Signal(syscall.SIGTERM) }
	a.cmd.WaitDelay = 15 * time.Second // then SIGKILL
	if err := a.cmd.Start(); err != nil {
		cancel()
		tb.Fatalf("start device-agent run (%s): %v", b.arch, err)
	}
	go func() {
		a.err = a.cmd.Wait()
		close(a.done)
	}()
	tb.Cleanup(func() {
		a.cancel()
		<-a.done
		if tb.Failed() {
			tb.Logf("device-agent run (%s) log:\n%s", b.arch, a.logs.String())
		}
	})
	return a
}

// stop sends SIGTERM and expects a clean exit.
func (a *runningAgent) stop(tb testing.TB) {
	tb.Helper()
	a.cancel()
	<-a.done
	if code := a.cmd.ProcessState.ExitCode(); code != 0 {
		tb.Fatalf("device-agent run exited with %d after SIGTERM: %v", code, a.err)
	}
}

// waitFor polls cond until it holds. It fails the test after d, or at once
// when the agent a (if any) exits.
func waitFor(tb testing.TB, a *runningAgent, d time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var exited <-chan struct{}
	if a != nil {
		exited = a.done
	}
	for !cond() {
		select {
		case <-deadline.C:
			tb.Fatalf("timed out after %s waiting for %s", d, what)
		case <-exited:
			tb.Fatalf("device-agent exited (%v) while waiting for %s", a.err, what)
		case <-tick.C:
		}
	}
}

// restartServer starts a node on the data folder and the very ports of the
// closed node s. Another process may take a freed port meanwhile: binding
// is retried for a while.
func restartServer(tb testing.TB, s *testServer, enrollAddr, mqttAddr string) *testServer {
	tb.Helper()
	cfg := s.cfg
	cfg.EnrollAddr, cfg.MQTTAddr = enrollAddr, mqttAddr
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		srv, err := server.New(cfg)
		if err != nil {
			tb.Fatalf("new server: %v", err)
		}
		err = srv.Start()
		if err == nil {
			tb.Cleanup(func() {
				if err := srv.Close(); err != nil {
					tb.Errorf("close server: %v", err)
				}
			})
			return &testServer{Server: srv, cfg: cfg, clock: s.clock, logs: s.logs}
		}
		if cerr := srv.Close(); cerr != nil {
			tb.Logf("close the server that did not start: %v", cerr)
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			tb.Fatalf("restart on %s and %s: %v", enrollAddr, mqttAddr, err)
		}
		<-tick.C
	}
}

// telemetrySample is the part of the agent's telemetry the tests read.
type telemetrySample struct {
	Time         string  `json:"time"`
	UptimeS      float64 `json:"uptime_s"`
	MemTotalKB   uint64  `json:"mem_total_kb"`
	AgentVersion string  `json:"agent_version"`
}

// storedSample is one telemetry message as the node stored it.
type storedSample struct {
	received time.Time // by the node
	at       time.Time // sample time, by the agent
	s        telemetrySample
	payload  []byte
	first    *storedSample // for a re-sent sample, its first copy
}

// agentSamples lists id's telemetry through `fleetmq telemetry --json`, in
// the order the node stored it.
func (s *testServer) agentSamples(tb testing.TB, id string) []storedSample {
	tb.Helper()
	out, errs, code := s.cli(tb, "telemetry", id, "--json", "--limit", "100000")
	if code != 0 {
		tb.Fatalf("fleetmq telemetry: exit %d: %s", code, errs)
	}
	var got []storedSample
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var rec admin.TelemetryRecord
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			tb.Fatalf("telemetry record %q: %v", line, err)
		}
		x := storedSample{received: rec.Received, payload: rec.Payload}
		if rec.Topic != "devices/"+id+"/telemetry" || json.Unmarshal(rec.Payload, &x.s) != nil {
			tb.Fatalf("not agent telemetry: %s", line)
		}
		at, err := time.Parse(time.RFC3339, x.s.Time)
		if err != nil {
			tb.Fatalf("telemetry time %q: %v", x.s.Time, err)
		}
		x.at = at
		got = append(got, x)
	}
	return got
}

// checkSequence checks an agent's stored telemetry, sampled every interval
// from its first sample: in storage order every sample is newer than the
// previous one, except re-sends of one already stored (returned for the
// caller to judge), and none is missing. Sample k is taken at its k-th
// tick plus a scheduling delay, so a missing index is a lost sample; the
// check tolerates delays of up to nine tenths of the interval.
func checkSequence(tb testing.TB, smp []storedSample, interval time.Duration) (distinct, resent []storedSample) {
	tb.Helper()
	if len(smp) == 0 {
		tb.Fatal("no telemetry")
	}
	seen := make(map[string]*storedSample)
	for i := range smp {
		x := &smp[i]
		if f := seen[x.s.Time]; f != nil {
			if !bytes.Equal(f.payload, x.payload) {
				tb.Fatalf("two different samples at %s", x.s.Time)
			}
			x.first = f
			resent = append(resent, *x)
			continue
		}
		seen[x.s.Time] = x
		if n := len(distinct); n > 0 && !x.at.After(distinct[n-1].at) {
			tb.Fatalf("sample of %s stored after the one of %s", x.at.Format(time.RFC3339Nano), distinct[n-1].at.Format(time.RFC3339Nano))
		}
		distinct = append(distinct, *x)
	}
	t0 := distinct[0].at
	var missing []string
	next := 0
	for _, x := range distinct {
		k := int(math.Floor(float64(x.at.Sub(t0)+interval/10) / float64(interval)))
		for ; next < k; next++ {
			missing = append(missing, fmt.Sprintf("#%d (~%s)", next, t0.Add(time.Duration(next)*interval).Format(time.RFC3339Nano)))
		}
		if k < next {
			tb.Fatalf("samples of %s and the one before fall on the same tick", x.at.Format(time.RFC3339Nano))
		}
		next = k + 1
	}
	if len(missing) > 0 {
		tb.Fatalf("%d of %d samples missing: %s", len(missing), next, strings.Join(missing, ", "))
	}
	return distinct, resent
}

func (s *testServer) deviceInfo(tb testing.TB, id string) admin.DeviceInfo {
	tb.Helper()
	out, errs, code := s.cli(tb, "device", "show", id, "--json")
	var d admin.DeviceInfo
	if code != 0 || json.Unmarshal([]byte(out), &d) != nil {
		tb.Fatalf("fleetmq device show %s: exit %d: %s%s", id, code, out, errs)
	}
	return d
}

// serviceClient issues a service identity through the CLI and connects
// with it, as a backend would.
func serviceClient(tb testing.TB, s *testServer, name string) paho.Client {
	tb.Helper()
	dir := tb.TempDir()
	if _, errs, code := s.cli(tb, "service", "issue", name, "--out", dir); code != 0 {
		tb.Fatalf("service issue: %s", errs)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key"))
	if err != nil {
		tb.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		tb.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		tb.Fatal("ca.pem holds no certificate")
	}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + s.MQTTAddr().String()).
		SetClientID(name).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetTLSConfig(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		tb.Fatalf("connect %s: %v", name, tok.Error())
	}
	tb.Cleanup(func() { c.Disconnect(100) })
	return c
}

func subscribe(tb testing.TB, c paho.Client, filter string) <-chan paho.Message {
	tb.Helper()
	ch := make(chan paho.Message, 16)
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) {
		select {
		case ch <- m:
		default:
		}
	})
	if !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		tb.Fatalf("subscribe %s: %v", filter, tok.Error())
	}
	if st, ok := tok.(*paho.SubscribeToken); ok && st.Result()[filter] == 0x80 {
		tb.Fatalf("subscribe %s refused", filter)
	}
	return ch
}

func publish(tb testing.TB, c paho.Client, topic, payload string) {
	tb.Helper()
	if tok := c.Publish(topic, 1, false, payload); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		tb.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

func nextMessage(tb testing.TB, ch <-chan paho.Message, d time.Duration, what string) paho.Message {
	tb.Helper()
	select {
	case m := <-ch:
		return m
	case <-time.After(d):
		tb.Fatalf("no %s within %s", what, d)
		return nil
	}
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	return json.Unmarshal(a, &x) == nil && json.Unmarshal(b, &y) == nil && reflect.DeepEqual(x, y)
}
