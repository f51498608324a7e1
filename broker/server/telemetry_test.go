package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/fleetmq/fleetmq/broker/admin"
)

// publishAll publishes each payload at QoS 1 to id's telemetry topic and
// waits for its PUBACK, so that it is stored.
func publishAll(tb testing.TB, s *testServer, id string, payloads ...string) {
	tb.Helper()
	c := pahoClient(tb, s, s.enroll(tb, s.token(tb), id), id, nil)
	defer c.Disconnect(0)
	for _, p := range payloads {
		tok := c.Publish("devices/"+id+"/telemetry", 1, false, p)
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			tb.Fatalf("publish %q: %v", p, tok.Error())
		}
	}
}

// JSON whose strings hold bytes that are not UTF-8 passes json.Valid; embedded
// as it is, the record was not valid JSON (Python's json refused the line, jq
// changed the byte to U+FFFD).
func TestTelemetryJSONNotUTF8(t *testing.T) {
	s := startServer(t)
	payload := "{\"a\":\"\xff\"}"
	publishAll(t, s, "pi-u1", payload)
	out, errs, code := s.cli(t, "telemetry", "pi-u1", "--json")
	if code != 0 {
		t.Fatalf("telemetry --json: %s", errs)
	}
	if !utf8.ValidString(out) {
		t.Fatalf("telemetry --json printed invalid UTF-8: %q", out)
	}
	var rec admin.TelemetryRecord
	if err := json.Unmarshal([]byte(out), &rec); err != nil {
		t.Fatal(err)
	}
	if rec.Payload != nil || !bytes.Equal(rec.PayloadBase64, []byte(payload)) {
		t.Fatalf("payload %s, base64 %q; want the bytes %q in payload_base64", rec.Payload, rec.PayloadBase64, payload)
	}
	if out, _, _ := s.cli(t, "telemetry", "pi-u1"); !strings.Contains(out, "(9 bytes, binary) base64:") {
		t.Fatalf("telemetry:\n%q", out)
	}
}

// Without --json a JSON string is printed as its text, other JSON as it is:
// the payload null is not the empty payload.
func TestTelemetryNullPayload(t *testing.T) {
	s := startServer(t)
	publishAll(t, s, "pi-n1", "null", "", `"text"`)
	out, errs, code := s.cli(t, "telemetry", "pi-n1")
	if code != 0 {
		t.Fatalf("telemetry: %s", errs)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	want := []string{"  null", "  ", "  text"}
	if len(lines) != len(want) {
		t.Fatalf("telemetry printed %d lines, want %d:\n%s", len(lines), len(want), out)
	}
	for i, l := range lines {
		if !strings.HasSuffix(l, "devices/pi-n1/telemetry"+want[i]) {
			t.Errorf("line %d: %q, want it to end with the payload %q", i, l, strings.TrimSpace(want[i]))
		}
	}
}

// followTelemetry streams id's telemetry as `fleetmq telemetry --follow`
// does, until the test ends.
func followTelemetry(tb testing.TB, s *testServer, id string) <-chan admin.TelemetryRecord {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	recs := make(chan admin.TelemetryRecord, 10)
	done := make(chan error, 1)
	go func() {
		done <- admin.NewClient(s.AdminSocket()).Telemetry(ctx, id, "", 0, true, func(r admin.TelemetryRecord) error {
			select {
			case recs <- r:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	tb.Cleanup(func() {
		cancel()
		<-done
	})
	return recs
}

// nextRecord is the next followed message, which must be payload.
func nextRecord(tb testing.TB, recs <-chan admin.TelemetryRecord, payload string) {
	tb.Helper()
	select {
	case r := <-recs:
		if string(r.Payload) != payload {
			tb.Fatalf("followed payload %s, want %s", r.Payload, payload)
		}
	case <-time.After(10 * time.Second):
		tb.Fatalf("follow did not stream %s", payload)
	}
}

// A message received before the newest one shown (the server's clock was
// set back, as NTP does to a gateway whose clock ran ahead) is new all the
// same: --follow used to take every such message for one it had shown, and
// streamed nothing until the clock passed the newest message again.
func TestTelemetryFollowAfterClockSetBack(t *testing.T) {
	s := startServer(t)
	c := pahoClient(t, s, s.enroll(t, s.token(t), "pi-c1"), "pi-c1", nil)
	defer c.Disconnect(0)
	publish(t, c, "devices/pi-c1/telemetry", `{"n":1}`)
	s.clock.Advance(-time.Hour)
	recs := followTelemetry(t, s, "pi-c1")
	nextRecord(t, recs, `{"n":1}`)
	publish(t, c, "devices/pi-c1/telemetry", `{"n":2}`)
	nextRecord(t, recs, `{"n":2}`)
}
