package server_test

import (
	"crypto/tls"
	"encoding/json"
	"errors"
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
	d := s.enroll(tb, s.token(tb, "--device", id), id)
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
