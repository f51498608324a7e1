// Package metricstest scrapes a Prometheus endpoint over HTTP and reads
// values out of the text exposition, for tests.
package metricstest

import (
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Families is one parsed scrape, by metric name.
type Families map[string]*dto.MetricFamily

// Scrape GETs url (a /metrics endpoint) and parses the answer, failing the
// test on any error.
func Scrape(tb testing.TB, url string) Families {
	tb.Helper()
	resp, err := http.Get(url)
	if err != nil {
		tb.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		tb.Fatalf("scrape %s: %s: %s", url, resp.Status, b)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		tb.Fatalf("scrape %s: Content-Type %q, want the text format", url, ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		tb.Fatalf("scrape %s: parse: %v", url, err)
	}
	return fams
}

// Value returns the value of the counter, gauge or untyped sample of name
// whose labels include labels (name, value pairs), or the sample count of
// a histogram, and whether exactly one sample matched.
func (f Families) Value(name string, labels ...string) (float64, bool) {
	fam, ok := f[name]
	if !ok {
		return 0, false
	}
	var out float64
	n := 0
	for _, m := range fam.GetMetric() {
		if !hasLabels(m, labels) {
			continue
		}
		n++
		switch {
		case m.Counter != nil:
			out = m.Counter.GetValue()
		case m.Gauge != nil:
			out = m.Gauge.GetValue()
		case m.Untyped != nil:
			out = m.Untyped.GetValue()
		case m.Histogram != nil:
			out = float64(m.Histogram.GetSampleCount())
		}
	}
	return out, n == 1
}

// Want fails the test unless name{labels} is exactly want.
func (f Families) Want(tb testing.TB, want float64, name string, labels ...string) {
	tb.Helper()
	got, ok := f.Value(name, labels...)
	if !ok {
		tb.Errorf("%s%s: no single sample; have %s", name, fmtLabels(labels), f.Describe(name))
		return
	}
	if got != want {
		tb.Errorf("%s%s = %v, want %v", name, fmtLabels(labels), got, want)
	}
}

// Describe lists the samples of name, for failure messages.
func (f Families) Describe(name string) string {
	fam, ok := f[name]
	if !ok {
		return "no such metric"
	}
	var lines []string
	for _, m := range fam.GetMetric() {
		var ls []string
		for _, l := range m.GetLabel() {
			ls = append(ls, l.GetName(), l.GetValue())
		}
		v := 0.0
		switch {
		case m.Counter != nil:
			v = m.Counter.GetValue()
		case m.Gauge != nil:
			v = m.Gauge.GetValue()
		case m.Histogram != nil:
			v = float64(m.Histogram.GetSampleCount())
		}
		lines = append(lines, fmt.Sprintf("%s=%v", fmtLabels(ls), v))
	}
	sort.Strings(lines)
	return strings.Join(lines, " ")
}

func hasLabels(m *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		found := false
		for _, l := range m.GetLabel() {
			if l.GetName() == labels[i] && l.GetValue() == labels[i+1] {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func fmtLabels(labels []string) string {
	if len(labels) == 0 {
		return ""
	}
	var parts []string
	for i := 0; i+1 < len(labels); i += 2 {
		parts = append(parts, fmt.Sprintf("%s=%q", labels[i], labels[i+1]))
	}
	return "{" + strings.Join(parts, ",") + "}"
}
