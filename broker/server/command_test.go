package server_test

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// TestDeviceCommandCLI: `fleetmq device command` publishes to a device's
// command topic as a backend would, returns the device's reply with
// --wait, and refuses what would reach no one or no device.
func TestDeviceCommandCLI(t *testing.T) {
	s := startServer(t)
	const id = "pi-cmd"
	d := s.enroll(t, s.token(t, "--device", id), id)

	// Not connected: the agent keeps no session, so nothing would get it.
	_, errs, code := s.cli(t, "device", "command", id, "ping")
	if code != 1 || !strings.Contains(errs, "is not connected") || !strings.Contains(errs, "(device_offline)") {
		t.Fatalf("command to an offline device: exit %d: %s", code, errs)
	}

	// The device: answers ping on events/pong, takes the rest silently.
	got := make(chan paho.Message, 8)
	c := pahoClient(t, s, d, id, nil)
	defer c.Disconnect(0)
	tok := c.Subscribe("devices/"+id+"/commands/#", 1, func(cl paho.Client, m paho.Message) {
		got <- m
		if m.Topic() == "devices/"+id+"/commands/ping" {
			cl.Publish("devices/"+id+"/events/pong", 1, false, "pong:"+string(m.Payload()))
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	out, errs, code := s.cli(t, "device", "command", id, "ping", "secret-7", "--wait", "15s", "--json")
	var res admin.CommandResult
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil {
		t.Fatalf("ping --wait: exit %d: %s%s", code, out, errs)
	}
	if !res.Online || res.Topic != "devices/"+id+"/commands/ping" || res.Reply == nil ||
		res.Reply.Topic != "devices/"+id+"/events/pong" || !jsonEqual(res.Reply.Payload, []byte(`"pong:secret-7"`)) {
		t.Fatalf("ping --wait answered %s", out)
	}
	if m := nextMessage(t, got, 5*time.Second, "the ping"); string(m.Payload()) != "secret-7" || m.Qos() != 1 {
		t.Fatalf("device got %s at QoS %d", m.Payload(), m.Qos())
	}

	out, errs, code = s.cli(t, "device", "command", id, "interval", "10s")
	if code != 0 || !strings.Contains(out, "interval sent to pi-cmd on devices/pi-cmd/commands/interval") {
		t.Fatalf("interval: exit %d: %s%s", code, out, errs)
	}
	if m := nextMessage(t, got, 5*time.Second, "the interval command"); m.Topic() != "devices/"+id+"/commands/interval" || string(m.Payload()) != "10s" {
		t.Fatalf("device got %s on %s", m.Payload(), m.Topic())
	}

	// Sub-levels are one command; a device that does not answer fails
	// --wait, though the command went out.
	out, errs, code = s.cli(t, "device", "command", id, "config/set", "x=1", "--wait", "1s")
	if code != 1 || !strings.Contains(out, "config/set sent to pi-cmd") || !strings.Contains(errs, "no event from pi-cmd within 1s") {
		t.Fatalf("unanswered --wait: exit %d: %s%s", code, out, errs)
	}
	if m := nextMessage(t, got, 5*time.Second, "config/set"); m.Topic() != "devices/"+id+"/commands/config/set" {
		t.Fatalf("device got %s", m.Topic())
	}

	// Arguments that cannot be a command: exit 2, nothing sent.
	for _, args := range [][]string{
		{id, "a/+"}, {id, "#"}, {id, "a//b"}, {id, "x/"}, {id, "ping", "--wait", "2m"}, {id, "ping", "--wait", "500ms"},
		{id}, {id, "ping", "a", "b"}, {id, ""}, {".", "ping"},
		{id, "ping", strings.Repeat("p", admin.MaxCommandPayload+1)},
		{id, strings.Repeat("n", 600)},
	} {
		_, errs, code := s.cli(t, append([]string{"device", "command"}, args...)...)
		if code != 2 {
			t.Errorf("device command %.40q: exit %d, want 2: %s", args, code, errs)
		}
	}
	select {
	case m := <-got:
		t.Fatalf("a refused command reached the device: %s %s", m.Topic(), m.Payload())
	default:
	}

	// Only devices take commands, and not revoked ones.
	s.identity(t, "backend-cmd", store.RoleService)
	if _, errs, code := s.cli(t, "device", "command", "backend-cmd", "ping"); code != 1 || !strings.Contains(errs, "commands go to devices (id_mismatch)") {
		t.Errorf("command to a service: exit %d: %s", code, errs)
	}
	if _, errs, code := s.cli(t, "device", "command", "nobody", "ping"); code != 1 || !strings.Contains(errs, "(not_found)") {
		t.Errorf("command to no one: exit %d: %s", code, errs)
	}
	// The server holds to the same bounds for a client other than the CLI.
	for _, wait := range []string{"1ns", "999ms", "61s"} {
		_, err := admin.NewClient(s.AdminSocket()).Command(t.Context(), id, admin.CommandRequest{Name: "ping", Wait: wait})
		var apiErr *admin.APIError
		if !errors.As(err, &apiErr) || apiErr.Code != enroll.CodeBadRequest || !strings.Contains(apiErr.Message, "from 1s to 1m0s") {
			t.Errorf("wait %s through the admin API: %v", wait, err)
		}
	}

	// Audited by name; the payload is not written down.
	out, _, _ = s.cli(t, "audit", "--device", id, "--json")
	var evs []store.AuditEvent
	if err := json.Unmarshal([]byte(out), &evs); err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, ev := range evs {
		if ev.Action == store.ActDeviceCommand {
			names[ev.Detail] = true
		}
	}
	if !names["ping"] || !names["interval"] || !names["config/set"] || len(names) != 3 || strings.Contains(out, "secret-7") {
		t.Errorf("audit of commands: %v\n%s", names, out)
	}

	if _, _, code := s.cli(t, "device", "revoke", id); code != 0 {
		t.Fatal("revoke failed")
	}
	if _, errs, code := s.cli(t, "device", "command", id, "ping"); code != 1 || !strings.Contains(errs, "(device_revoked)") {
		t.Errorf("command to a revoked device: exit %d: %s", code, errs)
	}
}

// TestDeviceCommandRefusedFails: a device's refusal on events/error fails
// `device command --wait` (exit 1) after printing it. interval and renew
// answer nothing when they work, so a script that took any reply for
// success read a refusal as the one outcome that exits 0.
func TestDeviceCommandRefusedFails(t *testing.T) {
	s := startServer(t)
	const id = "pi-refuse"
	commandTaker(t, s, id, "devices/"+id+"/commands/#", func(cl paho.Client, m paho.Message) {
		cl.Publish("devices/"+id+"/events/error", 1, false, `{"code":"invalid_payload","message":"interval must be between 1s and 24h"}`)
	})

	out, errs, code := s.cli(t, "device", "command", id, "interval", "1ms", "--wait", "15s")
	if code != 1 || !strings.Contains(out, "devices/"+id+"/events/error") || !strings.Contains(out, "interval must be between") ||
		!strings.Contains(errs, id+" refused the command") {
		t.Fatalf("refused interval: exit %d: %s%s", code, out, errs)
	}
	out, errs, code = s.cli(t, "device", "command", id, "interval", "1ms", "--wait", "15s", "--json")
	var res admin.CommandResult
	if code != 1 || json.Unmarshal([]byte(out), &res) != nil || res.Reply == nil || res.Reply.Topic != "devices/"+id+"/events/error" {
		t.Fatalf("refused interval --json: exit %d: %s%s", code, out, errs)
	}
}

// TestDeviceCommandNotSubscribed: a connected device that does not
// subscribe to a command's topic is refused as device_offline, since
// nothing would get the command, but the message says it is connected:
// "is not connected … send it again when device list --online shows it"
// sent the operator after a device that list showed online all along.
func TestDeviceCommandNotSubscribed(t *testing.T) {
	s := startServer(t)
	const id = "pi-picky"
	commandTaker(t, s, id, "devices/"+id+"/commands/ping", func(paho.Client, paho.Message) {})

	_, errs, code := s.cli(t, "device", "command", id, "renew")
	if code != 1 || !strings.Contains(errs, id+" is connected but does not subscribe to devices/"+id+"/commands/renew") ||
		strings.Contains(errs, "not connected") || !strings.Contains(errs, "(device_offline)") {
		t.Fatalf("command the device does not subscribe to: exit %d: %s", code, errs)
	}
}

// commandTaker enrolls device id and connects it, subscribed to filter
// with handle, until the test ends.
func commandTaker(tb testing.TB, s *testServer, id, filter string, handle paho.MessageHandler) {
	tb.Helper()
	labelledTaker(tb, s, id, nil, filter, handle)
}

// labelledTaker is commandTaker for a device enrolled with a token of
// labels (k=v).
func labelledTaker(tb testing.TB, s *testServer, id string, labels []string, filter string, handle paho.MessageHandler) {
	tb.Helper()
	args := []string{"--device", id}
	for _, l := range labels {
		args = append(args, "--label", l)
	}
	d := s.enroll(tb, s.token(tb, args...), id)
	c := pahoClient(tb, s, d, id, nil)
	tb.Cleanup(func() { c.Disconnect(0) })
	tok := c.Subscribe(filter, 1, handle)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		tb.Fatalf("subscribe %s: %v", filter, tok.Error())
	}
}

// TestDeviceCommandQueuedInKeptSession: a device that keeps its session
// while away (clean session false) gets a command when it is back; the
// command is sent, not refused, and --wait says the device is away
// rather than that it did not answer.
func TestDeviceCommandQueuedInKeptSession(t *testing.T) {
	s := startServer(t)
	const id = "pi-kept"
	d := s.enroll(t, s.token(t, "--device", id), id)
	got := make(chan paho.Message, 4)
	opts := paho.NewClientOptions().AddBroker("tls://" + s.MQTTAddr().String()).SetClientID(id).
		SetProtocolVersion(4).SetCleanSession(false).SetAutoReconnect(false).
		SetTLSConfig(&tls.Config{RootCAs: s.CA().Pool(), Certificates: []tls.Certificate{*d.tlsCert()}}).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { got <- m })
	connect := func() paho.Client {
		c := paho.NewClient(opts)
		if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("connect: %v", tok.Error())
		}
		return c
	}
	c := connect()
	if tok := c.Subscribe("devices/"+id+"/commands/#", 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	c.Disconnect(0)
	eventually(t, func() bool { return !slices.Contains(s.Broker().Online(), id) }, id+" offline")

	out, errs, code := s.cli(t, "device", "command", id, "ping", "later", "--wait", "1s")
	if code != 1 || !strings.Contains(out, "queued in the session "+id+" kept") ||
		!strings.Contains(errs, "no event from "+id+" within 1s: it is not connected; the command waits in the session it kept") {
		t.Fatalf("command to a kept session: exit %d: %s%s", code, out, errs)
	}
	c = connect()
	defer c.Disconnect(0)
	if m := nextMessage(t, got, 10*time.Second, "the queued command"); m.Topic() != "devices/"+id+"/commands/ping" || string(m.Payload()) != "later" {
		t.Fatalf("device got %s on %s", m.Payload(), m.Topic())
	}
}

// TestDeviceCommandDisconnectEndsWait: a device that disconnects instead
// of answering ends --wait at once, and the command says so; it waited
// out the whole --wait (up to a minute) and then said the device did not
// answer.
func TestDeviceCommandDisconnectEndsWait(t *testing.T) {
	s := startServer(t)
	const id = "pi-leaves"
	commandTaker(t, s, id, "devices/"+id+"/commands/#", func(cl paho.Client, _ paho.Message) { go cl.Disconnect(0) })

	out, errs, code := s.cli(t, "device", "command", id, "reboot", "--wait", "30s", "--json")
	var res admin.CommandResult
	if code != 1 || json.Unmarshal([]byte(out), &res) != nil || !res.Disconnected || res.Reply != nil ||
		!strings.Contains(errs, id+" disconnected before answering: the command was sent") {
		t.Fatalf("command the device leaves on: exit %d: %s%s", code, out, errs)
	}
}

// answerer answers ping on events/pong with its payload, refuses
// interval on events/error, and takes the rest silently, as the agent.
func answerer(id string) paho.MessageHandler {
	return func(cl paho.Client, m paho.Message) {
		switch m.Topic() {
		case "devices/" + id + "/commands/ping":
			cl.Publish("devices/"+id+"/events/pong", 1, false, "pong:"+string(m.Payload()))
		case "devices/" + id + "/commands/interval":
			cl.Publish("devices/"+id+"/events/error", 1, false, `{"code":"invalid_payload"}`)
		}
	}
}

// commandOutcomes runs `device command args... --json` and returns each
// device's outcome and the exit code.
func commandOutcomes(tb testing.TB, s *testServer, args ...string) (map[string]admin.DeviceCommandResult, int) {
	tb.Helper()
	out, errs, code := s.cli(tb, append(append([]string{"device", "command"}, args...), "--json")...)
	var res []admin.DeviceCommandResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		tb.Fatalf("device command %q: exit %d: %v: %s%s", args, code, err, out, errs)
	}
	got := map[string]admin.DeviceCommandResult{}
	for _, r := range res {
		got[r.DeviceID] = r
	}
	return got, code
}

// TestDeviceCommandMany: `device command --all|--label` sends to each
// device selected (not services, not revoked ones) in one request, tells
// which are not connected rather than failing the others, collects the
// replies in one window, and exits 0 only when every device got it (and
// answered).
func TestDeviceCommandMany(t *testing.T) {
	s := startServer(t)
	for _, dev := range []struct{ id, site string }{{"pi-a1", "a"}, {"pi-a2", "a"}, {"pi-b1", "b"}} {
		labelledTaker(t, s, dev.id, []string{"site=" + dev.site, "rack=1"}, "devices/"+dev.id+"/commands/#", answerer(dev.id))
	}
	s.enroll(t, s.token(t, "--device", "pi-a-off", "--label", "site=a"), "pi-a-off")
	s.identity(t, "backend-many", store.RoleService)
	s.enroll(t, s.token(t, "--device", "pi-gone", "--label", "site=a"), "pi-gone")
	if _, _, code := s.cli(t, "device", "revoke", "pi-gone"); code != 0 {
		t.Fatal("revoke failed")
	}

	start := time.Now()
	got, code := commandOutcomes(t, s, "--all", "ping", "secret-42", "--wait", "30s")
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("--all --wait 30s took %s though every connected device answered at once", took)
	}
	want := map[string]string{"pi-a1": admin.OutcomeReplied, "pi-a2": admin.OutcomeReplied, "pi-b1": admin.OutcomeReplied, "pi-a-off": admin.OutcomeNotConnected}
	if code != 1 || len(got) != len(want) {
		t.Fatalf("--all ping: exit %d, %v", code, got)
	}
	for id, o := range want {
		if got[id].Outcome != o {
			t.Errorf("--all ping: %s %s, want %s", id, got[id].Outcome, o)
		}
	}
	if r := got["pi-b1"].Reply; r == nil || r.Topic != "devices/pi-b1/events/pong" || !jsonEqual(r.Payload, []byte(`"pong:secret-42"`)) {
		t.Errorf("pi-b1's reply: %+v", r)
	}

	out, errs, code := s.cli(t, "device", "command", "--label", "site=a", "--label", "rack=1", "ping", "--wait", "30s")
	if code != 0 || !strings.Contains(out, "pi-a1 replied: ") || !strings.Contains(out, "pi-a2 replied: ") ||
		strings.Contains(out, "pi-b1") || strings.Contains(out, "pi-a-off") || !strings.Contains(out, "ping to 2 devices: 2 replied\n") {
		t.Fatalf("--label site=a --label rack=1: exit %d: %s%s", code, out, errs)
	}
	out, errs, code = s.cli(t, "device", "command", "--label", "site=a", "renew")
	if code != 1 || !strings.Contains(out, "pi-a-off not connected: nothing sent") ||
		!strings.Contains(errs, "renew to 3 devices: 2 sent, 1 not connected; 1 of 3 did not get it") {
		t.Fatalf("--label site=a renew: exit %d: %s%s", code, out, errs)
	}

	if out, errs, code := s.cli(t, "device", "command", "--label", "site=b", "ping", "--wait", "30s"); code != 0 || !strings.HasSuffix(out, "ping to 1 device: 1 replied\n") {
		t.Errorf("--label site=b ping: exit %d: %s%s", code, out, errs)
	}

	// A refusal on events/error fails the command, as for one device.
	got, code = commandOutcomes(t, s, "--label", "site=b", "interval", "1ms", "--wait", "30s")
	if code != 1 || got["pi-b1"].Outcome != admin.OutcomeRefused || got["pi-b1"].Reply == nil {
		t.Fatalf("refused interval: exit %d, %v", code, got)
	}

	// Devices that do not answer: one window for all, not one each.
	start = time.Now()
	got, code = commandOutcomes(t, s, "--label", "rack=1", "renew", "--wait", "2s")
	if took := time.Since(start); code != 1 || len(got) != 3 || took > 5*time.Second {
		t.Fatalf("unanswered renew --wait 2s to 3 devices: exit %d in %s: %v", code, took, got)
	}
	for id, r := range got {
		if r.Outcome != admin.OutcomeNoReply {
			t.Errorf("unanswered renew: %s %s", id, r.Outcome)
		}
	}

	// Refused before anything is sent: exit 2 for the CLI's own checks,
	// 1 for what the server refuses.
	for _, args := range [][]string{
		{"--all"}, {"--all", "--label", "site=a", "ping"}, {"--label", "site", "ping"}, {"--label", "=a", "ping"},
		{"--label", "site=a", "--label", "site=b", "ping"}, {"--all", "ping", "a", "b"}, {"--all", "ping", "--wait", "2m"},
	} {
		if _, errs, code := s.cli(t, append([]string{"device", "command"}, args...)...); code != 2 {
			t.Errorf("device command %q: exit %d, want 2: %s", args, code, errs)
		}
	}
	if _, errs, code := s.cli(t, "device", "command", "--label", "site=zz", "ping"); code != 1 ||
		!strings.Contains(errs, `no device that is not revoked has the labels "site=zz"`) || !strings.Contains(errs, "(not_found)") {
		t.Errorf("a label no device has: exit %d: %s", code, errs)
	}
	if _, errs, code := s.cli(t, "device", "command", "--all", "a/+"); code != 2 || !strings.Contains(errs, "cannot be a command") {
		t.Errorf("--all with a bad name: exit %d: %s", code, errs)
	}

	// One audit record per device sent to, by name; none for those that
	// got nothing, nor for services and revoked devices.
	out, _, _ = s.cli(t, "audit", "--json")
	var evs []store.AuditEvent
	if err := json.Unmarshal([]byte(out), &evs); err != nil {
		t.Fatal(err)
	}
	pings := map[string]int{}
	for _, ev := range evs {
		if ev.Action == store.ActDeviceCommand && ev.Detail == "ping" {
			pings[ev.DeviceID]++
		}
	}
	if pings["pi-a1"] != 2 || pings["pi-a2"] != 2 || pings["pi-b1"] != 2 || len(pings) != 3 || strings.Contains(out, "secret-42") {
		t.Errorf("audit of pings: %v", pings)
	}
}

// TestDeviceCommandManyEmptyFleet: --all to a fleet with no device
// (only a service, a revoked device) is refused, not a success for none.
func TestDeviceCommandManyEmptyFleet(t *testing.T) {
	s := startServer(t)
	s.identity(t, "backend-only", store.RoleService)
	if _, errs, code := s.cli(t, "device", "command", "--all", "ping"); code != 1 || !strings.Contains(errs, "no device to send to") {
		t.Errorf("--all to no device: exit %d: %s", code, errs)
	}
}

// BenchmarkCommandAll measures `device command --all ping --wait 5s` to
// 500 connected devices that answer: the whole command's wall time, and
// that every reply is collected.
func BenchmarkCommandAll(b *testing.B) {
	const n = 500
	s := startServer(b)
	for i := range n {
		id := fmt.Sprintf("pi-%04d", i)
		d := s.identity(b, id, store.RoleDevice)
		c := pahoClient(b, s, d, id, nil)
		b.Cleanup(func() { c.Disconnect(0) })
		if tok := c.Subscribe("devices/"+id+"/commands/#", 1, answerer(id)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			b.Fatalf("subscribe %s: %v", id, tok.Error())
		}
	}
	b.ResetTimer()
	for b.Loop() {
		got, code := commandOutcomes(b, s, "--all", "ping", "--wait", "5s")
		replied := 0
		for _, r := range got {
			if r.Outcome == admin.OutcomeReplied {
				replied++
			}
		}
		if code != 0 || replied != n {
			b.Fatalf("exit %d, %d of %d replied", code, replied, n)
		}
		b.ReportMetric(float64(replied), "replies")
	}
}

// TestDeviceCommandManyDisconnect: a device that disconnects instead of
// answering is reported disconnected, and the window ends once every
// device answered or left, not at --wait.
func TestDeviceCommandManyDisconnect(t *testing.T) {
	s := startServer(t)
	commandTaker(t, s, "pi-stays", "devices/pi-stays/commands/#", answerer("pi-stays"))
	commandTaker(t, s, "pi-leaves", "devices/pi-leaves/commands/#", func(cl paho.Client, _ paho.Message) { go cl.Disconnect(0) })
	start := time.Now()
	got, code := commandOutcomes(t, s, "--all", "ping", "--wait", "30s")
	if took := time.Since(start); code != 1 || got["pi-stays"].Outcome != admin.OutcomeReplied ||
		got["pi-leaves"].Outcome != admin.OutcomeDisconnected || took > 20*time.Second {
		t.Fatalf("--all ping, one device leaving: exit %d in %s: %v", code, took, got)
	}
}
