package enroll

import (
	"fmt"
	"testing"
	"time"
)

func TestFailureLimiterPerAddressAndPrefix(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	l := newFailureLimiter(1, 2, func() time.Time { return now })
	for range 2 {
		l.failed("2001:db8:1:2::1")
	}
	for _, tc := range []struct {
		remote string
		ok     bool
	}{
		{"2001:db8:1:2::1", false},
		{"2001:db8:1:2:ffff:ffff:ffff:ffff", false}, // same /64: one host's pick
		{"2001:db8:1:2::7%eth0", false},
		{"2001:db8:1:3::1", true}, // another /64
		{"192.0.2.1", true},
		{"not an address", true},
	} {
		if _, ok := l.allowed(tc.remote); ok != tc.ok {
			t.Errorf("allowed(%s) = %v, want %v", tc.remote, ok, tc.ok)
		}
	}
	for range 2 {
		l.failed("192.0.2.1")
	}
	if _, ok := l.allowed("192.0.2.2"); !ok {
		t.Error("IPv4 neighbours share a bucket")
	}
	if wait, ok := l.allowed("192.0.2.1"); ok || wait <= 0 || wait > time.Second {
		t.Errorf("allowed after a burst = %v %v, want a wait of at most 1 s", wait, ok)
	}
	// A whole burst's refill time later the entries are gone.
	now = now.Add(2 * time.Second)
	l.failed("198.51.100.1")
	if n := len(l.entries); n != 1 || l.order.Len() != 1 {
		t.Errorf("%d entries (%d in order) after the refill time, want 1", n, l.order.Len())
	}
}

// Full of addresses failing at once, the table stays bounded and keeps
// the latest, each failure in constant time.
func TestFailureLimiterBounded(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	l := newFailureLimiter(0.2, 1, func() time.Time { return now })
	l.max = 100
	for i := range 1000 {
		l.failed(fmt.Sprintf("10.0.%d.%d", i/256, i%256))
		if len(l.entries) > l.max || l.order.Len() != len(l.entries) {
			t.Fatalf("after %d failures: %d entries, %d in order, max %d", i+1, len(l.entries), l.order.Len(), l.max)
		}
	}
	if _, ok := l.allowed("10.0.3.231"); ok { // the 1000th
		t.Error("the latest failing address was forgotten")
	}
	if _, ok := l.allowed("10.0.0.0"); !ok {
		t.Error("the stalest address is still limited in a full table")
	}
}

// BenchmarkFailureLimiterFull is a failure from a new address while the
// table is full of addresses that failed within the last minute: the case
// of a flood from many addresses, where every enrollment request waits for
// the limiter's mutex.
func BenchmarkFailureLimiterFull(b *testing.B) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	l := newFailureLimiter(0.2, 10, func() time.Time { return now })
	for i := range maxLimiterEntries {
		l.failed(fmt.Sprintf("10.%d.%d.%d", i>>16, (i>>8)&255, i&255))
	}
	addrs := make([]string, 4096)
	for i := range addrs {
		addrs[i] = fmt.Sprintf("172.16.%d.%d", i>>8, i&255)
	}
	i := 0
	for b.Loop() {
		l.failed(addrs[i%len(addrs)])
		i++
	}
}
