package store

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/bbolt"
)

// Request states. A request is claimed exactly once, either by the writer
// (taken) or by its caller giving up while it is still queued (cancelled).
const (
	reqQueued int32 = iota
	reqTaken
	reqCancelled
)

// request is one unit of work for the writer: either fn, run inside a group's
// write transaction, or excl, run alone between groups.
type request struct {
	ctx   context.Context
	fn    txFunc
	excl  func() error
	state atomic.Int32
	done  chan error // buffered 1; receives exactly one answer once taken
}

// txFunc is a write submitted to the writer.
//
// A txFunc may run more than once: when another request of its group fails,
// the group's transaction is rolled back and the survivors run again in a
// fresh one. So a txFunc must read everything it needs from tx, must not
// accumulate into variables outside itself (results are assigned, not
// appended, on every run), and should validate before it writes, returning an
// error without touching tx when the request cannot be applied.
type txFunc func(tx *bbolt.Tx) error

// update submits fn to the writer and waits until the group holding it has
// committed (nil) or fn's own error or a commit error is known. A request
// whose ctx ends before the writer takes it is dropped with ctx.Err(); once
// taken, it runs to completion regardless of ctx.
func (db *DB) update(ctx context.Context, fn txFunc) error {
	return db.submit(ctx, &request{ctx: ctx, fn: fn, done: make(chan error, 1)})
}

// exclusive runs fn on the writer goroutine with no write transaction open.
func (db *DB) exclusive(ctx context.Context, fn func() error) error {
	return db.submit(ctx, &request{ctx: ctx, excl: fn, done: make(chan error, 1)})
}

func (db *DB) submit(ctx context.Context, r *request) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := db.enqueue(ctx, r); err != nil {
		return err
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		if r.state.CompareAndSwap(reqQueued, reqCancelled) {
			return ctx.Err()
		}
		// The writer has it: its outcome is the truth, and it will come.
		return <-r.done
	}
}

func (db *DB) enqueue(ctx context.Context, r *request) error {
	db.mu.RLock()
	defer db.mu.RUnlock()
	if db.closed {
		return ErrClosed
	}
	select {
	case db.reqs <- r:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// writeLoop is the only goroutine that writes. It takes one request, then
// whatever else is already queued, and commits them together.
func (db *DB) writeLoop() {
	defer close(db.writerDone)
	batch := make([]*request, 0, db.maxBatch)
	for r := range db.reqs {
		batch = append(batch[:0], r)
	drain:
		for len(batch) < db.maxBatch {
			select {
			case r, ok := <-db.reqs:
				if !ok {
					break drain
				}
				batch = append(batch, r)
			default:
				break drain
			}
		}
		db.runBatch(batch)
		clear(batch) // let finished requests be collected
	}
}

// runBatch commits the batch's transactional requests as groups, keeping
// the queue order around exclusive requests.
func (db *DB) runBatch(batch []*request) {
	var group []*request
	for _, r := range batch {
		if !r.state.CompareAndSwap(reqQueued, reqTaken) {
			continue // its caller already returned ctx.Err()
		}
		if err := r.ctx.Err(); err != nil {
			r.done <- err
			continue
		}
		if r.excl != nil {
			db.commitGroup(group)
			group = group[:0]
			r.done <- r.excl()
			continue
		}
		group = append(group, r)
	}
	db.commitGroup(group)
}

// commitGroup runs group in one transaction. If one request fails, the
// transaction is rolled back, that request gets its error and the others run
// again in a fresh transaction. No request is answered nil before the commit
// that holds its writes has returned nil.
func (db *DB) commitGroup(group []*request) {
	if err := db.Damaged(); err != nil && len(group) > 0 {
		for _, r := range group {
			r.done <- err
		}
		return
	}
	for len(group) > 0 {
		failed := -1
		var failErr error
		start := time.Now()
		err := db.guard(func() error {
			return db.bolt.Update(func(tx *bbolt.Tx) error {
				for i, r := range group {
					if err := r.fn(tx); err != nil {
						failed, failErr = i, err
						return err
					}
				}
				return nil
			})
		})
		if errors.Is(err, ErrDamaged) {
			failed = -1 // every request of the group gets it
		}
		if failed >= 0 {
			group[failed].done <- failErr
			db.log.Debug().Int("group", len(group)).Msg("store: request failed in group, retrying the rest")
			group = slices.Delete(group, failed, failed+1)
			continue
		}
		if err != nil {
			err = fmt.Errorf("commit: %w", restoreErrno(err))
			db.log.Error().Err(err).Int("group", len(group)).Msg("store: commit failed")
		}
		if db.onCommit != nil {
			db.onCommit(time.Since(start), len(group), err)
		}
		if db.groupHook != nil {
			db.groupHook(len(group))
		}
		for _, r := range group {
			r.done <- err
		}
		return
	}
}

// errnoError is an error whose errno was flattened into its text.
type errnoError struct {
	err   error
	errno syscall.Errno
}

func (e errnoError) Error() string   { return e.err.Error() }
func (e errnoError) Unwrap() []error { return []error{e.err, e.errno} }

// restoreErrno makes errors.Is find the errno of a commit that failed for
// want of space: bbolt formats the error of growing the file with %s
// ("file resize error: truncate …: file too large"), and callers tell a
// full disk (over once space is freed) from a fault by the errno.
func restoreErrno(err error) error {
	for _, errno := range []syscall.Errno{syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG} {
		if errors.Is(err, errno) {
			return err
		}
		if strings.HasSuffix(err.Error(), ": "+errno.Error()) {
			return errnoError{err, errno}
		}
	}
	return err
}
