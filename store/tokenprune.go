package store

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	"go.etcd.io/bbolt"
)

// tokenPruneExamined is the most token records one transaction of
// PruneTokens looks at, as certPruneExamined. A variable for tests only.
var tokenPruneExamined = 2_000

// PruneTokens deletes the records of tokens that expired before before,
// used or not: a production line mints thousands a day, and an expired
// token can do nothing more. Their creation and every use stay in the
// audit log. It works in transactions of at most tokenPruneExamined
// records and returns how many it deleted.
func (db *DB) PruneTokens(ctx context.Context, before time.Time) (int, error) {
	n, err := db.pruneInSteps(ctx, func(tx *bbolt.Tx, resume []byte) (int, []byte, error) {
		return pruneTokensTx(tx, resume, before)
	})
	if err != nil {
		return n, fmt.Errorf("prune tokens: %w", err)
	}
	return n, nil
}

// pruneTokensTx prunes from the token key resume on, and returns how many
// records it deleted and the key to go on from (nil: done).
func pruneTokensTx(tx *bbolt.Tx, resume []byte, before time.Time) (int, []byte, error) {
	toks, ids := tx.Bucket(bucketTokens), tx.Bucket(bucketTokenIDs)
	c := toks.Cursor()
	k, v := c.First()
	if resume != nil {
		k, v = c.Seek(resume)
	}
	type doomed struct {
		hash, id []byte
		bound    string
	}
	var gone []doomed
	var next []byte
	for examined := 0; k != nil; k, v = c.Next() {
		if examined == tokenPruneExamined {
			next = bytes.Clone(k)
			break
		}
		examined++
		var t Token
		if err := json.Unmarshal(v, &t); err != nil {
			return 0, nil, fmt.Errorf("decode token %x: %w", k[:min(len(k), 6)], err)
		}
		if t.ExpiresAt.Before(before) {
			gone = append(gone, doomed{bytes.Clone(k), []byte(t.ID), t.DeviceID})
		}
	}
	for _, g := range gone {
		if err := toks.Delete(g.hash); err != nil {
			return 0, nil, fmt.Errorf("delete token %s: %w", g.id, err)
		}
		if g.bound != "" {
			if err := tx.Bucket(bucketTokenBound).Delete(boundTokenKey(g.bound, g.hash)); err != nil {
				return 0, nil, fmt.Errorf("delete token %s from the bound-token index: %w", g.id, err)
			}
		}
		// The id index points at this token only if no later token took
		// the id (ids are unique while both exist, see CreateTokens).
		if bytes.Equal(ids.Get(g.id), g.hash) {
			if err := ids.Delete(g.id); err != nil {
				return 0, nil, fmt.Errorf("delete token id %s: %w", g.id, err)
			}
		}
	}
	return len(gone), next, nil
}
