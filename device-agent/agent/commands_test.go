package agent

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestParseCommand(t *testing.T) {
	const id = "pi-7"
	pre := "devices/pi-7/commands/"
	cases := []struct {
		name     string
		topic    string
		payload  string
		retained bool
		kind     commandKind
		interval time.Duration
		code     string
	}{
		{"ping", pre + "ping", `{"n":1}`, false, cmdPing, 0, ""},
		{"ping empty", pre + "ping", "", false, cmdPing, 0, ""},
		{"renew", pre + "renew", "", false, cmdRenew, 0, ""},
		{"interval", pre + "interval", "10s", false, cmdInterval, 10 * time.Second, ""},
		{"interval spaces", pre + "interval", " 2m\n", false, cmdInterval, 2 * time.Minute, ""},
		{"interval min", pre + "interval", "1s", false, cmdInterval, time.Second, ""},
		{"interval max", pre + "interval", "24h", false, cmdInterval, 24 * time.Hour, ""},
		{"interval too short", pre + "interval", "999ms", false, 0, 0, "invalid_payload"},
		{"interval too long", pre + "interval", "25h", false, 0, 0, "invalid_payload"},
		{"interval negative", pre + "interval", "-5s", false, 0, 0, "invalid_payload"},
		{"interval garbage", pre + "interval", "soon", false, 0, 0, "invalid_payload"},
		{"unknown", pre + "reboot", "", false, 0, 0, "unknown_command"},
		{"nested", pre + "ping/extra", "", false, 0, 0, "unknown_command"},
		{"empty name", pre, "", false, 0, 0, "unknown_command"},
		{"other device", "devices/pi-8/commands/ping", "", false, 0, 0, "unknown_command"},
		{"retained renew", pre + "renew", "", true, 0, 0, "retained_command"},
		{"huge payload", pre + "ping", strings.Repeat("x", maxCommandPayload+1), false, 0, 0, "payload_too_large"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cmd, cerr := parseCommand(id, c.topic, []byte(c.payload), c.retained)
			if c.code != "" {
				if cerr == nil || cerr.Code != c.code {
					t.Fatalf("error = %+v, want code %s", cerr, c.code)
				}
				if cmd.kind != 0 {
					t.Fatalf("refused command has kind %v: it could be executed", cmd.kind)
				}
				return
			}
			if cerr != nil {
				t.Fatalf("unexpected error %+v", cerr)
			}
			if cmd.kind != c.kind || cmd.interval != c.interval {
				t.Fatalf("got kind %v interval %v, want %v %v", cmd.kind, cmd.interval, c.kind, c.interval)
			}
		})
	}
}

func TestPongPayload(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	var got struct {
		Time    string          `json:"time"`
		Request json.RawMessage `json:"request"`
	}
	if err := json.Unmarshal(pongPayload(now, []byte(`{"nonce":42}`)), &got); err != nil {
		t.Fatal(err)
	}
	if got.Time != "2025-01-02T03:04:05.000Z" || string(got.Request) != `{"nonce":42}` {
		t.Errorf("pong = %+v", got)
	}
	if err := json.Unmarshal(pongPayload(now, []byte("hello \"x\"")), &got); err != nil {
		t.Fatal(err)
	}
	if string(got.Request) != `"hello \"x\""` {
		t.Errorf("non-JSON request echoed as %s", got.Request)
	}
}

func TestErrorEventPayload(t *testing.T) {
	b := errorEventPayload(time.Unix(0, 0), "reboot", &commandError{"unknown_command", "unknown command"})
	var got map[string]string
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got["command"] != "reboot" || got["code"] != "unknown_command" || got["message"] == "" || got["time"] == "" {
		t.Errorf("event = %v", got)
	}
}
