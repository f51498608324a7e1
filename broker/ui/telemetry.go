package ui

import (
	"bytes"
	"encoding/json"
	"math"
	"slices"
	"strings"

	"github.com/fleetmq/fleetmq/store"
)

// numericFields returns the top-level numeric fields of a JSON object
// payload; anything else (not JSON, not an object, strings, nested values)
// has none.
func numericFields(payload []byte) map[string]float64 {
	payload = bytes.TrimSpace(payload)
	if len(payload) == 0 || payload[0] != '{' {
		return nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(payload, &obj); err != nil {
		return nil
	}
	out := make(map[string]float64)
	for k, raw := range obj {
		if len(raw) == 0 || !(raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9') {
			continue
		}
		var v float64
		if err := json.Unmarshal(raw, &v); err != nil || math.IsInf(v, 0) {
			continue
		}
		out[k] = v
	}
	return out
}

// stringField returns the top-level string field name of a JSON object
// payload, or "".
func stringField(payload []byte, name string) string {
	var obj map[string]json.RawMessage
	if json.Unmarshal(payload, &obj) != nil {
		return ""
	}
	var s string
	if json.Unmarshal(obj[name], &s) != nil {
		return ""
	}
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
// field present.
func buildSeries(msgs []store.Message) []series {
	byName := map[string]*series{}
	for _, m := range msgs {
		t := float64(m.Received.UnixMilli())
		for k, v := range numericFields(m.Payload) {
			s := byName[k]
			if s == nil {
				s = &series{Name: k, Label: fieldLabel(k)}
				byName[k] = s
			}
			s.Points = append(s.Points, [2]float64{t, v})
		}
	}
	out := make([]series, 0, len(byName))
	for _, s := range byName {
		out = append(out, *s)
	}
	slices.SortFunc(out, func(a, b series) int {
		ia, ib := rank(a.Name), rank(b.Name)
		if ia != ib {
			return ia - ib
		}
		return strings.Compare(a.Name, b.Name)
	})
	if len(out) > maxSeries {
		out = out[:maxSeries]
	}
	return out
}

func rank(name string) int {
	if i := slices.Index(preferred, name); i >= 0 {
		return i
	}
	return len(preferred)
}
