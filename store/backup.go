package store

import (
	"context"
	"fmt"
	"io"

	"go.etcd.io/bbolt"
)

// Backup writes a consistent snapshot of the whole store to w — a file that
// Open accepts — while readers and the writer carry on. size, when set, is
// called with the snapshot's length before its first byte is written, so
// an HTTP handler can send a Content-Length and a cut stream shows.
//
// The snapshot is one read transaction for as long as w takes: meanwhile
// pages the writer frees are not reused (the file may grow), and a commit
// that needs a larger memory map waits for it. Give it a fast writer.
// Cancelling ctx stops the copy at the next write.
func (db *DB) Backup(ctx context.Context, w io.Writer, size func(int64)) (int64, error) {
	var n int64
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		if size != nil {
			size(tx.Size())
		}
		var err error
		n, err = tx.WriteTo(ctxWriter{ctx: ctx, w: w})
		return err
	})
	if err != nil {
		return n, fmt.Errorf("backup: %w", err)
	}
	return n, nil
}

// ctxWriter fails writes once ctx is done: without it a backup to a
// stalled reader would hold its read transaction, and Close, until the
// reader went away.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}
