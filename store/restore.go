package store

import (
	"context"
	"fmt"
	"time"

	"go.etcd.io/bbolt"
)

// Meta keys of a backup copy: when its snapshot was taken, and when a
// server first ran on it, i.e. when it was restored.
var (
	keySnapshotAt = []byte("snapshot_at")
	keyRestoredAt = []byte("restored_at")
)

// MarkSnapshot records in a backup copy that its content is the fleet as
// it stood at at: certificates issued later exist but are not in it. A
// backup tool calls it on the copy, never on a live store.
func (db *DB) MarkSnapshot(ctx context.Context, at time.Time) error {
	err := db.update(ctx, func(tx *bbolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if err := meta.Put(keySnapshotAt, []byte(at.UTC().Format(time.RFC3339Nano))); err != nil {
			return err
		}
		return meta.Delete(keyRestoredAt)
	})
	if err != nil {
		return fmt.Errorf("mark snapshot: %w", err)
	}
	return nil
}

// RestoredWindow reports whether this store is a backup copy (see
// MarkSnapshot) and, if so, the span in which certificates may have been
// issued that it has no record of: from the snapshot to the first time a
// server ran on the copy, which the first call records as now. A first
// call with now before the snapshot fails and records nothing: the clock
// is wrong, and a restore time before the snapshot would leave no span, so
// that no device that renewed after the backup would ever be taken back.
func (db *DB) RestoredWindow(ctx context.Context, now time.Time) (from, to time.Time, ok bool, err error) {
	err = db.update(ctx, func(tx *bbolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		raw := meta.Get(keySnapshotAt)
		if raw == nil {
			return nil
		}
		if from, err = time.Parse(time.RFC3339Nano, string(raw)); err != nil {
			return fmt.Errorf("snapshot time %q: %w", raw, err)
		}
		if raw := meta.Get(keyRestoredAt); raw != nil {
			to, err = time.Parse(time.RFC3339Nano, string(raw))
			if err != nil {
				return fmt.Errorf("restore time %q: %w", raw, err)
			}
		} else {
			if now.Before(from) {
				return fmt.Errorf("the clock says %s, before this backup's snapshot at %s: the clock is wrong "+
					"(a machine without a real-time clock, not yet set by NTP?); set it, then start fleetmq again",
					now.UTC().Format(time.RFC3339), from.UTC().Format(time.RFC3339))
			}
			to = now.UTC()
			if err := meta.Put(keyRestoredAt, []byte(to.Format(time.RFC3339Nano))); err != nil {
				return err
			}
		}
		ok = true
		return nil
	})
	if err != nil {
		return time.Time{}, time.Time{}, false, fmt.Errorf("restored window: %w", err)
	}
	return from, to, ok, nil
}
