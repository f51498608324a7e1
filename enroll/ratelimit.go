package enroll

import (
	"fmt"
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// failureLimiter rate-limits failed attempts per remote address. Successful
// requests cost nothing, so a busy production line behind one NAT address
// is never slowed down by its own enrollments, only by its mistakes.
type failureLimiter struct {
	rate  rate.Limit
	burst int
	now   func() time.Time

	mu        sync.Mutex
	entries   map[string]*limiterEntry
	lastSweep time.Time
}

type limiterEntry struct {
	lim  *rate.Limiter
	seen time.Time
}

// maxLimiterEntries bounds memory under an attack from many addresses; idle
// entries (full buckets) are swept first.
const maxLimiterEntries = 100_000

func newFailureLimiter(r float64, burst int, now func() time.Time) *failureLimiter {
	return &failureLimiter{rate: rate.Limit(r), burst: burst, now: now, entries: map[string]*limiterEntry{}}
}

// allowed reports whether remote may try again, and if not, how long to wait.
func (l *failureLimiter) allowed(remote string) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.entries[remote]
	if !ok {
		return 0, true
	}
	now := l.now()
	if tokens := e.lim.TokensAt(now); tokens < 1 {
		return time.Duration((1 - tokens) / float64(l.rate) * float64(time.Second)), false
	}
	return 0, true
}

// failed charges one failure to remote.
func (l *failureLimiter) failed(remote string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	l.sweep(now)
	e, ok := l.entries[remote]
	if !ok {
		e = &limiterEntry{lim: rate.NewLimiter(l.rate, l.burst)}
		l.entries[remote] = e
	}
	e.seen = now
	e.lim.AllowN(now, 1)
}

// sweep drops entries whose bucket has refilled, at most once a minute or
// when the table is full.
func (l *failureLimiter) sweep(now time.Time) {
	if now.Sub(l.lastSweep) < time.Minute && len(l.entries) < maxLimiterEntries {
		return
	}
	l.lastSweep = now
	for k, e := range l.entries {
		if e.lim.TokensAt(now) >= float64(l.burst) {
			delete(l.entries, k)
		}
	}
	if len(l.entries) >= maxLimiterEntries {
		// Still full of active attackers: forget the oldest half rather
		// than grow without bound.
		cutoff := now.Add(-time.Minute)
		for k, e := range l.entries {
			if e.seen.Before(cutoff) {
				delete(l.entries, k)
			}
		}
	}
}

// retryAfter carries whole seconds to wait in a rate_limited error.
type retryAfter int

func (r retryAfter) Error() string { return fmt.Sprintf("retry after %ds", int(r)) }

func rateLimited(wait time.Duration) *Error {
	secs := int(math.Ceil(wait.Seconds()))
	if secs < 1 {
		secs = 1
	}
	return &Error{Code: CodeRateLimited, Message: fmt.Sprintf("too many failed attempts; retry after %d s", secs), Err: retryAfter(secs)}
}
