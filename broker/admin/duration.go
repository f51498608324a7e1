package admin

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// ParseDuration is time.ParseDuration plus a "d" (24 h) unit, since
// certificate lifetimes, token lifetimes and retention are spoken of in
// days. It is the one parser of durations typed by operators — flags, the
// admin API and the dashboard — so that "7d" means the same everywhere. A
// value that does not fit a time.Duration (about 292 years) is an error,
// not a wrapped-around negative.
func ParseDuration(s string) (time.Duration, error) {
	if n, ok := strings.CutSuffix(s, "d"); ok {
		days, err := strconv.ParseFloat(n, 64)
		if err != nil || math.IsNaN(days) || math.IsInf(days, 0) {
			return 0, fmt.Errorf("invalid duration %q (use e.g. 90s, 12h, 30d)", s)
		}
		d := days * float64(24*time.Hour)
		if d >= math.MaxInt64 || d <= math.MinInt64 {
			return 0, fmt.Errorf("duration %q is too long (at most 106751d)", s)
		}
		return time.Duration(d), nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		// time's messages do not tell an overflow from a typo.
		return 0, fmt.Errorf("invalid duration %q (use e.g. 90s, 12h, 30d; at most 106751d)", s)
	}
	return d, nil
}
