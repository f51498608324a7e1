package enroll

import (
	"container/list"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/fleetmq/fleetmq/enroll/peeraddr"
	"golang.org/x/time/rate"
)

// failureLimiter rate-limits failed attempts per remote address. Successful
// requests cost nothing, so a busy production line behind one NAT address
// is never slowed down by its own enrollments, only by its mistakes.
//
// IPv6 clients are limited per /64, the block one host or site gets: a
// host picks any address in it at will. The table is bounded and kept in
// order of last failure, so that both dropping refilled entries and, when
// it is full, forgetting the stalest one take constant time; every request
// consults it under one mutex.
type failureLimiter struct {
	rate  rate.Limit
	burst int
	now   func() time.Time
	max   int // entries kept at most; default maxLimiterEntries

	mu      sync.Mutex
	entries map[string]*list.Element // of *limiterEntry
	order   list.List                // least recently failed first
}

type limiterEntry struct {
	key  string
	lim  *rate.Limiter
	seen time.Time
}

// maxLimiterEntries bounds memory under an attack from many addresses.
const maxLimiterEntries = 100_000

func newFailureLimiter(r float64, burst int, now func() time.Time) *failureLimiter {
	return &failureLimiter{rate: rate.Limit(r), burst: burst, now: now, max: maxLimiterEntries, entries: map[string]*list.Element{}}
}

// limiterKey is what failures are counted against: the address, or for
// IPv6 its /64.
func limiterKey(remote string) string { return peeraddr.Of(remote) }

// allowed reports whether remote may try again, and if not, how long to wait.
func (l *failureLimiter) allowed(remote string) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	el, ok := l.entries[limiterKey(remote)]
	if !ok {
		return 0, true
	}
	return l.wait(el.Value.(*limiterEntry), l.now())
}

func (l *failureLimiter) wait(e *limiterEntry, now time.Time) (time.Duration, bool) {
	if tokens := e.lim.TokensAt(now); tokens < 1 {
		return time.Duration((1 - tokens) / float64(l.rate) * float64(time.Second)), false
	}
	return 0, true
}

// failed charges one failure to remote, in the same critical section as
// the check that its bucket has a token left: when it has none, nothing is
// charged and failed says how long to wait, as allowed does. A check on
// arrival alone does not bound failures: requests that hold back their
// bodies all pass it before the first of them has failed.
func (l *failureLimiter) failed(remote string) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	l.sweep(now)
	key := limiterKey(remote)
	el, ok := l.entries[key]
	if ok {
		l.order.MoveToBack(el)
	} else {
		if l.order.Len() >= l.max {
			// Full of addresses failing now: forget the stalest rather
			// than grow without bound.
			l.drop(l.order.Front())
		}
		el = l.order.PushBack(&limiterEntry{key: key, lim: rate.NewLimiter(l.rate, l.burst)})
		l.entries[key] = el
	}
	e := el.Value.(*limiterEntry)
	e.seen = now
	if wait, ok := l.wait(e, now); !ok {
		return wait, false
	}
	e.lim.AllowN(now, 1)
	return 0, true
}

// sweep drops the entries whose bucket has surely refilled: those whose
// last failure is a whole burst's refill time ago. They are at the front.
func (l *failureLimiter) sweep(now time.Time) {
	refill := time.Duration(float64(l.burst) / float64(l.rate) * float64(time.Second))
	for el := l.order.Front(); el != nil && now.Sub(el.Value.(*limiterEntry).seen) >= refill; el = l.order.Front() {
		l.drop(el)
	}
}

func (l *failureLimiter) drop(el *list.Element) {
	delete(l.entries, el.Value.(*limiterEntry).key)
	l.order.Remove(el)
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
