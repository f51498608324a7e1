package ui

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
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
	for _, s := range []string{`{"a": 1.5, "b": "x"}`, `{"a": -0}`, `{"a": 1e400}`, `[]`, `{`, `{"a": {"b": 1}}`, `{"a":1,"a":2}`,
		`{"a":1,"a":"x"}`, `{"a\"b": 1, "c": [1, "]"]}`, "\u00a0{\"a\": 2}\u0085", `{"caf\u00e9": 1, "café": null}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		if got, want := numericFields(p), refNumericFields(p); !reflect.DeepEqual(got, want) {
			t.Fatalf("%q: numericFields %v, encoding/json finds %v", p, got, want)
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

// refNumericFields is numericFields as it was, decoding with
// encoding/json: the reference for the member scanner.
func refNumericFields(payload []byte) map[string]float64 {
	var obj map[string]json.RawMessage
	if payload = bytes.TrimSpace(payload); len(payload) == 0 || payload[0] != '{' || json.Unmarshal(payload, &obj) != nil {
		return nil
	}
	out := make(map[string]float64)
	for k, raw := range obj {
		var v float64
		if raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9' {
			if json.Unmarshal(raw, &v) == nil && !math.IsInf(v, 0) {
				out[k] = v
			}
		}
	}
	return out
}

// refBuildSeries is buildSeries as it was: every numeric field's series,
// sorted, then cut.
func refBuildSeries(msgs []store.Message) []series {
	byName := map[string]*series{}
	for _, m := range msgs {
		for k, v := range refNumericFields(m.Payload) {
			if byName[k] == nil {
				byName[k] = &series{Name: k, Label: fieldLabel(k)}
			}
			byName[k].Points = append(byName[k].Points, [2]float64{float64(m.Received.UnixMilli()), v})
		}
	}
	var out []series
	for _, s := range byName {
		out = append(out, *s)
	}
	slices.SortFunc(out, func(a, b series) int {
		if ra, rb := rank(a.Name), rank(b.Name); ra != rb {
			return ra - rb
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out[:min(len(out), maxSeries)]
}

// The member scanner finds what encoding/json finds: the same fields, the
// same plots, in the same order, whatever the keys, values and spacing.
func TestSeriesMatchReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	// Distinct keys, also once decoded: a repeated key is checked below.
	keys := append(slices.Clone(preferred), "a", "b", "zeta", `caf\u00e9`, "naïve", `q\"uote`, "x y", "", "f001", "f010")
	values := []string{"1", "-2.5e3", "0", "1e400", `"12"`, "true", "null", `{"cpu_temp_c": 1}`, `[1, {"a": "}"}]`, `"a\"}b"`}
	t0 := time.UnixMilli(1_700_000_000_000)
	for round := range 300 {
		var msgs []store.Message
		for i := range 1 + rng.IntN(8) {
			var b strings.Builder
			b.WriteString(" {")
			for j, k := range rng.Perm(len(keys))[:rng.IntN(len(keys))] {
				if j > 0 {
					b.WriteString(", ")
				}
				fmt.Fprintf(&b, "\"%s\" :\n%s", keys[k], values[rng.IntN(len(values))])
			}
			b.WriteString("} ")
			p := b.String()
			if rng.IntN(10) == 0 {
				p = p[:rng.IntN(len(p))] // cut short: not JSON
			}
			msgs = append(msgs, store.Message{Received: t0.Add(time.Duration(i) * time.Second), Payload: []byte(p)})
		}
		for _, m := range msgs {
			if got, want := numericFields(m.Payload), refNumericFields(m.Payload); !reflect.DeepEqual(got, want) {
				t.Fatalf("round %d: numericFields(%s) = %v, want %v", round, m.Payload, got, want)
			}
		}
		got, want := buildSeries(msgs), refBuildSeries(msgs)
		if len(got) != len(want) || (len(got) > 0 && !reflect.DeepEqual(got, want)) {
			t.Fatalf("round %d: series\n%+v\nwant\n%+v", round, got, want)
		}
	}
	// A repeated key counts as encoding/json counts it: the last one.
	// (Among more than maxSeries fields, one chosen for a number that a
	// repeat then overrides costs a plot; JSON leaves repeats undefined.)
	for _, p := range []string{`{"a": 1, "a": "x"}`, `{"a": "x", "a": 2}`, `{"a": 1, "a": 3}`} {
		msgs := []store.Message{{Received: t0, Payload: []byte(p)}}
		if got, want := buildSeries(msgs), refBuildSeries(msgs); len(got) != len(want) || (len(got) > 0 && !reflect.DeepEqual(got, want)) {
			t.Errorf("%s: series %+v, want %+v", p, got, want)
		}
		if got, want := numericFields([]byte(p)), refNumericFields([]byte(p)); !reflect.DeepEqual(got, want) {
			t.Errorf("numericFields(%s) = %v, want %v", p, got, want)
		}
	}
	if got := stringField([]byte(`{"agent_version": "1", "x": {"agent_version": "2"}, "agent_version": "3"}`), "agent_version"); got != "3" {
		t.Errorf("stringField: %q, want the last top-level one, 3", got)
	}
}

// A device may send the newest 500 messages as 64 KiB objects of
// thousands of numbers. Decoding each into a map, and each number with
// encoding/json, took 7 s of CPU per view of its page (500 messages of
// 4,800 fields), mostly in allocations: building the plots now allocates
// for the fields plotted, not for every field of every message.
func TestBuildSeriesCostIsForPlottedFields(t *testing.T) {
	const fields = 2000
	var b strings.Builder
	b.WriteString("{")
	for i := range fields {
		if i > 0 {
			b.WriteString(",")
		}
		// Keys in falling order, each better than those before it: the
		// worst case for choosing the first fields.
		fmt.Fprintf(&b, `"f%05d":%d.5`, fields-i, i)
	}
	b.WriteString("}")
	msgs := make([]store.Message, 50)
	for i := range msgs {
		msgs[i] = store.Message{Received: time.UnixMilli(int64(i)), Payload: []byte(b.String())}
	}
	var got []series
	allocs := testing.AllocsPerRun(1, func() { got = buildSeries(msgs) })
	if len(got) != maxSeries || got[0].Name != "f00001" || len(got[0].Points) != len(msgs) {
		t.Fatalf("series %v…", got[0])
	}
	// The first message's fields, each briefly chosen, the points, and
	// slack: encoding/json made a million.
	if max := float64(2 * fields); allocs > max {
		t.Errorf("%.0f allocations for %d messages of %d fields, want at most %.0f", allocs, len(msgs), fields, max)
	}
}
