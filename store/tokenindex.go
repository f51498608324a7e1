package store

import (
	"bytes"
	"fmt"
	"slices"

	"go.etcd.io/bbolt"
)

// The bound-token index leads from a device id to the tokens bound to it,
// so that the one-usable-token-per-id check (usableTokens), which runs
// inside the writer's transaction at every token create and free-token
// enrollment, reads those tokens only: scanning every token record took
// 25–39 ms at 100,000 stored tokens, while every commit waited.
//
// A key is the bound id, a zero byte (no id holds one), and the token's
// raw SHA-256; the value is empty. Entries are added when a token is
// created (a token's binding never changes) and deleted with its record.
// Open rebuilds the index, so a store written by a fleetmq without it, or
// by one since, is indexed before it is used.

func boundTokenKey(id string, hash []byte) []byte {
	k := make([]byte, 0, len(id)+1+len(hash))
	k = append(k, id...)
	k = append(k, 0)
	return append(k, hash...)
}

// indexBoundTokens rebuilds the bound-token index from the token records.
// A free token whose label is named device_id may be indexed under the
// label's value (see boundID): usableTokens checks the decoded binding.
func indexBoundTokens(tx *bbolt.Tx) error {
	if tx.Bucket(bucketTokenBound) != nil {
		if err := tx.DeleteBucket(bucketTokenBound); err != nil {
			return fmt.Errorf("rebuild the bound-token index: %w", err)
		}
	}
	idx, err := tx.CreateBucket(bucketTokenBound)
	if err != nil {
		return fmt.Errorf("rebuild the bound-token index: %w", err)
	}
	var keys [][]byte
	err = tx.Bucket(bucketTokens).ForEach(func(k, v []byte) error {
		if id := boundID(v); len(id) > 0 {
			keys = append(keys, boundTokenKey(string(id), k))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("rebuild the bound-token index: %w", err)
	}
	// In key order: bbolt splits nodes only at commit, so keys put in any
	// other order each move the rest of one growing node (15 s at 100,000
	// tokens, against 1 ms to open the store without the index).
	slices.SortFunc(keys, bytes.Compare)
	idx.FillPercent = 1
	for _, k := range keys {
		if err := idx.Put(k, nil); err != nil {
			return fmt.Errorf("rebuild the bound-token index: %w", err)
		}
	}
	return nil
}

// boundTokenHashes returns the hashes of the tokens the index holds for id.
func boundTokenHashes(tx *bbolt.Tx, id string) [][32]byte {
	prefix := boundTokenKey(id, nil)
	var out [][32]byte
	c := tx.Bucket(bucketTokenBound).Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		var h [32]byte
		if copy(h[:], k[len(prefix):]) == len(h) {
			out = append(out, h)
		}
	}
	return out
}

var deviceIDField = []byte(`"device_id":"`)

// boundID returns the device_id of a token record as putToken stores it,
// without decoding it, or nil for a free token: json.Marshal writes the
// fields in Token's order, so the first "device_id" is the field itself
// when the token has one (a label of that name comes later), and escapes
// no character an id may hold. A free token may yield a label's value.
func boundID(rec []byte) []byte {
	i := bytes.Index(rec, deviceIDField)
	if i < 0 {
		return nil
	}
	rest := rec[i+len(deviceIDField):]
	if j := bytes.IndexByte(rest, '"'); j >= 0 {
		return rest[:j]
	}
	return nil
}
