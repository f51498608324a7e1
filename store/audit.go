package store

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"

	"go.etcd.io/bbolt"
)

// appendAudit stores evs under fresh sequence numbers and trims the oldest
// events past db.auditKeep. Sequence numbers come from the bucket's sequence,
// which rolls back with the transaction, so committed numbers are contiguous
// and trimming only ever removes the lowest: the count is last-first+1.
func (db *DB) appendAudit(tx *bbolt.Tx, evs []AuditEvent) error {
	b := tx.Bucket(bucketAudit)
	b.FillPercent = 0.95 // keys only grow: pack pages
	for _, ev := range evs {
		seq, err := b.NextSequence()
		if err != nil {
			return fmt.Errorf("audit sequence: %w", err)
		}
		ev.Seq = seq
		if err := putJSON(b, seqKey(seq), ev); err != nil {
			return err
		}
	}
	c := b.Cursor()
	first, _ := c.First()
	last, _ := c.Last()
	if first == nil {
		return nil
	}
	excess := int64(binary.BigEndian.Uint64(last)-binary.BigEndian.Uint64(first)) + 1 - int64(db.auditKeep)
	for ; excess > 0; excess-- {
		k, _ := c.First()
		if k == nil {
			break
		}
		if err := b.Delete(slices.Clone(k)); err != nil {
			return fmt.Errorf("trim audit: %w", err)
		}
	}
	return nil
}

func seqKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 8), seq)
}

// AppendAudit appends evs, assigning each a new, increasing Seq (the Seq
// given is ignored; the caller's slice is not modified).
// They are on disk when it returns nil.
func (db *DB) AppendAudit(ctx context.Context, evs ...AuditEvent) error {
	if len(evs) == 0 {
		return nil
	}
	err := db.update(ctx, func(tx *bbolt.Tx) error {
		return db.appendAudit(tx, evs)
	})
	if err != nil {
		return fmt.Errorf("append audit: %w", err)
	}
	return nil
}

// auditCheckEvery is how many events Audit decodes between looks at ctx.
const auditCheckEvery = 4096

// Audit returns the newest f.Limit (default 1000) events matching f, oldest
// first. It walks back from the newest event and does not assume that event
// times grow with Seq (a clock may have been stepped back), so a narrow
// filter may read the whole log, which AuditKeep bounds.
func (db *DB) Audit(ctx context.Context, f AuditFilter) ([]AuditEvent, error) {
	limit := f.Limit
	if limit <= 0 {
		limit = 1000
	}
	var out []AuditEvent
	err := db.view(ctx, func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketAudit).Cursor()
		n := 0
		for k, v := c.Last(); k != nil && len(out) < limit; k, v = c.Prev() {
			if n++; n%auditCheckEvery == 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			var ev AuditEvent
			if err := json.Unmarshal(v, &ev); err != nil {
				return fmt.Errorf("decode audit %d: %w", binary.BigEndian.Uint64(k), err)
			}
			if f.DeviceID != "" && ev.DeviceID != f.DeviceID {
				continue
			}
			if !f.Since.IsZero() && ev.Time.Before(f.Since) {
				continue
			}
			out = append(out, ev)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read audit: %w", err)
	}
	slices.Reverse(out)
	return out, nil
}
