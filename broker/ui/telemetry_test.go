package ui

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/fleetmq/fleetmq/store"
)

func TestNumericFields(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want map[string]float64
	}{
		{`{"cpu_temp_c": 48.2, "load1": 0, "mem_available_kb": 612000, "agent_version": "1.0", "ok": true, "nested": {"a": 1}, "list": [1], "neg": -3e2}`,
			map[string]float64{"cpu_temp_c": 48.2, "load1": 0, "mem_available_kb": 612000, "neg": -300}},
		{`  {"a":1}  `, map[string]float64{"a": 1}},
		{`{"a": null}`, map[string]float64{}},
		{`[1, 2]`, nil},
		{`42`, nil},
		{`plain text`, nil},
		{`{"a": 1`, nil},
		{``, nil},
	} {
		got := numericFields([]byte(tc.in))
		if len(got) != len(tc.want) || (got == nil) != (tc.want == nil) {
			t.Errorf("%s: %v, want %v", tc.in, got, tc.want)
			continue
		}
		for k, v := range tc.want {
			if got[k] != v {
				t.Errorf("%s: %s = %v, want %v", tc.in, k, got[k], v)
			}
		}
	}
}

func TestBuildSeriesOrder(t *testing.T) {
	t0 := time.UnixMilli(1_700_000_000_000)
	msgs := []store.Message{
		{Received: t0, Payload: []byte(`{"zeta": 1, "mem_available_kb": 5, "load1": 0.5, "cpu_temp_c": 40}`)},
		{Received: t0.Add(time.Second), Payload: []byte(`not json`)},
		{Received: t0.Add(2 * time.Second), Payload: []byte(`{"alpha": 2, "cpu_temp_c": 41}`)},
	}
	got := buildSeries(msgs)
	var names []string
	for _, s := range got {
		names = append(names, s.Name)
	}
	want := []string{"cpu_temp_c", "load1", "mem_available_kb", "alpha", "zeta"}
	if len(names) != len(want) {
		t.Fatalf("series %v, want %v", names, want)
	}
	for i := range want {
		if names[i] != want[i] {
			t.Fatalf("series %v, want %v", names, want)
		}
	}
	cpu := got[0]
	if cpu.Label != "CPU temperature, °C" || len(cpu.Points) != 2 || cpu.Points[1] != [2]float64{float64(t0.Add(2 * time.Second).UnixMilli()), 41} {
		t.Fatalf("cpu series %+v", cpu)
	}
}

func FuzzNumericFields(f *testing.F) {
	for _, s := range []string{`{"a": 1.5, "b": "x"}`, `{"a": -0}`, `{"a": 1e400}`, `[]`, `{`, `{"a": {"b": 1}}`, `{"a":1,"a":2}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		got := numericFields(p)
		var obj map[string]any
		if json.Unmarshal(p, &obj) != nil {
			return // numericFields may still find fields in what it trims
		}
		for k, v := range got {
			if f, ok := obj[k].(float64); !ok || f != v {
				t.Fatalf("%q: field %s = %v, the JSON has %v", p, k, v, obj[k])
			}
		}
	})
}

// TestPayloadTextIsVisible: what a device sends is shown as text, never
// as raw control or bidirectional characters, and a long payload is cut
// on a character boundary (found by hand: the cut split a character and
// payloads over 4 KiB went out raw).
func TestPayloadTextIsVisible(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"ok\n\tline", "ok\n\tline"},
		{"esc\x1b[2Jx", `esc\x1b[2Jx`},
		{"rtl\u202eevil", `rtl\u202eevil`},
		{"bad\xffbyte", "bad\uFFFDbyte"},
	} {
		if got := payloadText([]byte(tc.in)); got != tc.want {
			t.Errorf("payloadText(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	long := strings.Repeat("A", 4095) + "é" + strings.Repeat("\x1b", 100)
	got := payloadText([]byte(long))
	if !utf8.ValidString(got) || strings.ContainsRune(got, 0x1b) || !strings.HasSuffix(got, "…\n") || len(got) > 4<<10+8 {
		t.Errorf("long payload shown as %q…%q", got[:10], got[len(got)-20:])
	}
	if got := cut(strings.Repeat("v", 100), 64); got != strings.Repeat("v", 64)+"…" {
		t.Errorf("cut = %q", got)
	}
}
