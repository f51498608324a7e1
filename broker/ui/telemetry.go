package ui

import (
	"bytes"
	"encoding/json"
	"slices"
	"strconv"
	"unicode/utf8"

	"github.com/fleetmq/fleetmq/store"
)

// A device page plots the newest 500 messages, and a device may send 64
// KiB objects of thousands of numeric fields: decoding each into a map,
// and each number with encoding/json, took 7 s of CPU per page view (500
// messages of 4,800 fields). So payloads are checked once with json.Valid
// and then walked member by member (members), numbers parsed with strconv,
// and only the fields that will be plotted are kept (buildSeries).

// members calls fn with the raw key (quoted) and the raw value of each
// top-level member of the JSON object p, in order, until fn returns false.
// It reports whether p is an object; p must be valid JSON (json.Valid).
func members(p []byte, fn func(key, value []byte) bool) bool {
	i := skipSpace(p, 0)
	if i >= len(p) || p[i] != '{' {
		return false
	}
	i = skipSpace(p, i+1)
	for i < len(p) && p[i] == '"' {
		end := endOfString(p, i)
		key := p[i:end]
		i = skipSpace(p, skipSpace(p, end)+1) // past the colon
		end = endOfValue(p, i)
		if !fn(key, p[i:end]) {
			break
		}
		if i = skipSpace(p, end); i < len(p) && p[i] == ',' {
			i = skipSpace(p, i+1)
		}
	}
	return true
}

func skipSpace(p []byte, i int) int {
	for i < len(p) && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r') {
		i++
	}
	return i
}

// endOfString returns the index after the string that starts at p[i].
func endOfString(p []byte, i int) int {
	for i++; i < len(p); i++ {
		switch p[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(p)
}

// endOfValue returns the index after the value that starts at p[i].
func endOfValue(p []byte, i int) int {
	if i >= len(p) {
		return len(p)
	}
	switch p[i] {
	case '"':
		return endOfString(p, i)
	case '{', '[':
		depth := 0
		for ; i < len(p); i++ {
			switch p[i] {
			case '"':
				i = endOfString(p, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return len(p)
	}
	// A number or a literal runs to the next delimiter.
	for i < len(p) && p[i] != ',' && p[i] != '}' && p[i] != ']' && p[i] != ' ' && p[i] != '\t' && p[i] != '\n' && p[i] != '\r' {
		i++
	}
	return i
}

// number parses a raw JSON value that is a number; ok is false for any
// other value, and for numbers beyond float64.
func number(raw []byte) (v float64, ok bool) {
	if len(raw) == 0 || !(raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9') {
		return 0, false
	}
	v, err := strconv.ParseFloat(string(raw), 64)
	return v, err == nil
}

// keyString decodes a raw JSON key as encoding/json does.
func keyString(raw []byte) string {
	if inner, ok := plainKey(raw); ok {
		return string(inner)
	}
	var k string
	_ = json.Unmarshal(raw, &k) // valid JSON: cannot fail
	return k
}

// plainKey returns the bytes of a raw JSON key that reads as itself: no
// escapes, valid UTF-8. Such keys are compared without a copy.
func plainKey(raw []byte) ([]byte, bool) {
	inner := raw[1 : len(raw)-1]
	return inner, bytes.IndexByte(inner, '\\') < 0 && utf8.Valid(inner)
}

// numericFields returns the top-level numeric fields of a JSON object
// payload; anything else (not JSON, not an object, strings, nested values)
// has none.
func numericFields(payload []byte) map[string]float64 {
	// Unicode spaces around the object too, as ever.
	payload = bytes.TrimSpace(payload)
	if !json.Valid(payload) {
		return nil
	}
	out := make(map[string]float64)
	if !members(payload, func(k, raw []byte) bool {
		// As encoding/json does with a repeated key, the last one counts.
		if v, ok := number(raw); ok {
			out[keyString(k)] = v
		} else {
			delete(out, keyString(k))
		}
		return true
	}) {
		return nil
	}
	return out
}

// stringField returns the top-level string field name of a JSON object
// payload, or "".
func stringField(payload []byte, name string) string {
	if !json.Valid(payload) {
		return ""
	}
	var s string
	members(payload, func(k, raw []byte) bool {
		if keyString(k) != name {
			return true
		}
		// As encoding/json does with a repeated key: the last one counts.
		s = ""
		_ = json.Unmarshal(raw, &s)
		return true
	})
	return s
}

// series is one plotted field: points of [received Unix ms, value].
type series struct {
	Name   string       `json:"name"`
	Label  string       `json:"label"`
	Points [][2]float64 `json:"points"`
}

// maxSeries is the most fields plotted on one device page.
const maxSeries = 12

// preferred fields come first, in this order: what an operator of Pis
// looks at first. Other fields follow by name.
var preferred = []string{"cpu_temp_c", "load1", "mem_available_kb", "load5", "load15", "wifi_signal_dbm", "disk_free_bytes", "uptime_s", "mem_total_kb"}

var fieldLabels = map[string]string{
	"cpu_temp_c":       "CPU temperature, °C",
	"load1":            "Load average, 1 min",
	"load5":            "Load average, 5 min",
	"load15":           "Load average, 15 min",
	"mem_available_kb": "Memory available, KiB",
	"mem_total_kb":     "Memory total, KiB",
	"disk_free_bytes":  "Disk free, bytes",
	"uptime_s":         "Uptime, s",
	"wifi_signal_dbm":  "Wi-Fi signal, dBm",
}

// fieldLabel is the caption of a field's plot.
func fieldLabel(name string) string {
	if l, ok := fieldLabels[name]; ok {
		return l
	}
	return name
}

// buildSeries turns messages (oldest first) into one series per numeric
// field present, the first maxSeries of them in plotting order. It reads
// the messages twice: to choose the fields, then to collect their points,
// so that fields that are not plotted cost neither memory nor copies.
// (Among more than maxSeries fields, one chosen for a number that a
// repeat of its key in the same object overrides costs a plot: JSON
// leaves repeated keys undefined.)
func buildSeries(msgs []store.Message) []series {
	valid := make([]bool, len(msgs))
	var chosen []field // in plotting order, at most maxSeries
	payloads := make([][]byte, len(msgs))
	for i, m := range msgs {
		payloads[i] = bytes.TrimSpace(m.Payload) // as numericFields
		if valid[i] = json.Valid(payloads[i]); !valid[i] {
			continue
		}
		members(payloads[i], func(k, raw []byte) bool {
			key, plain := plainKey(k)
			if !plain {
				key = []byte(keyString(k))
			}
			f := field{rank: rankBytes(key)}
			// Once the choice is full, most keys come after its last.
			if len(chosen) == maxSeries && plotOrder(f.rank, key, chosen[maxSeries-1]) > 0 {
				return true
			}
			at, found := slices.BinarySearchFunc(chosen, key, func(c field, key []byte) int { return -plotOrder(f.rank, key, c) })
			if found {
				return true
			}
			if _, ok := number(raw); ok {
				f.name = string(key)
				chosen = slices.Insert(chosen, at, f)
				chosen = chosen[:min(len(chosen), maxSeries)]
			}
			return true
		})
	}
	index := make(map[string]int, len(chosen))
	for i, f := range chosen {
		index[f.name] = i
	}
	out := make([]series, len(chosen))
	var last [maxSeries]float64
	var has [maxSeries]bool
	for i, m := range msgs {
		if !valid[i] {
			continue
		}
		has = [maxSeries]bool{}
		members(payloads[i], func(k, raw []byte) bool {
			key, plain := plainKey(k)
			if !plain {
				key = []byte(keyString(k))
			}
			if at, ok := index[string(key)]; ok {
				// As encoding/json does with a repeated key, the last
				// one counts.
				last[at], has[at] = number(raw)
			}
			return true
		})
		t := float64(m.Received.UnixMilli())
		for at := range out {
			if has[at] {
				out[at].Points = append(out[at].Points, [2]float64{t, last[at]})
			}
		}
	}
	// A field chosen for a number that a repeated key then overrode in
	// every message has no points, and no plot.
	plotted := out[:0]
	for i, s := range out {
		if len(s.Points) > 0 {
			s.Name, s.Label = chosen[i].name, fieldLabel(chosen[i].name)
			plotted = append(plotted, s)
		}
	}
	return plotted
}

// field is a field chosen for plotting, with its rank.
type field struct {
	name string
	rank int
}

// plotOrder orders fields for plotting: the preferred ones first, in their
// order, then the others by name. It compares a key of rank r in place,
// as bytes, with a chosen field.
func plotOrder(r int, key []byte, f field) int {
	if r != f.rank {
		return r - f.rank
	}
	for i := 0; i < len(key) && i < len(f.name); i++ {
		if key[i] != f.name[i] {
			return int(key[i]) - int(f.name[i])
		}
	}
	return len(key) - len(f.name)
}

func rankBytes(key []byte) int {
	for i, p := range preferred {
		if string(key) == p {
			return i
		}
	}
	return len(preferred)
}

func rank(name string) int {
	if i := slices.Index(preferred, name); i >= 0 {
		return i
	}
	return len(preferred)
}
