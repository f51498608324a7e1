// Package store keeps the fleet's state — tokens, identities, certificates,
// audit log, telemetry and presence — in one bbolt file owned by one process.
//
// Every write goes through a single writer goroutine that groups concurrent
// requests into one transaction (group commit), so many callers share one
// fsync pair instead of paying one each. Reads run concurrently in their own
// read transactions. No bbolt type appears in the exported API.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Errors of this file's API that the shared sentinels in types.go do not cover.
var (
	// ErrTokenExists: a token with the same hash or public id is already stored.
	ErrTokenExists = errors.New("token already exists")
	// ErrCertExists: a certificate with the same serial is already stored.
	ErrCertExists = errors.New("certificate serial already exists")
	// ErrInvalid: the caller passed a value the store refuses to write.
	ErrInvalid = errors.New("invalid argument")
	// ErrSchema: the file was written by a newer fleetmq or is not a fleetmq store.
	ErrSchema = errors.New("unsupported store schema")
)

// schemaVersion is the layout this code reads and writes.
const schemaVersion = 1

var (
	bucketMeta        = []byte("meta")
	bucketDevices     = []byte("devices")       // id -> JSON Device
	bucketTokens      = []byte("tokens")        // raw SHA-256 -> JSON Token
	bucketTokenIDs    = []byte("token_ids")     // public id -> raw SHA-256
	bucketCerts       = []byte("certs")         // serial -> JSON certRecord
	bucketDeviceCerts = []byte("device_certs")  // deviceCertKey(id, serial) -> empty
	bucketRevoked     = []byte("revoked_certs") // serial -> revocationValue, for the CRL
	bucketAudit       = []byte("audit")         // 8-byte big-endian seq -> JSON AuditEvent
	bucketTelemetry   = []byte("telemetry")     // device id -> sub-bucket of messages
	bucketPresence    = []byte("presence")      // device id -> JSON Presence
	bucketTokenBound  = []byte("token_bound")   // boundTokenKey(id, hash) -> empty; rebuilt at Open

	keySchema = []byte("schema")

	allBuckets = [][]byte{
		bucketMeta, bucketDevices, bucketTokens, bucketTokenIDs, bucketCerts,
		bucketDeviceCerts, bucketRevoked, bucketAudit, bucketTelemetry, bucketPresence,
		bucketTokenBound,
	}
)

// Options configures Open. The zero value is ready to use.
type Options struct {
	// LockTimeout is how long Open waits for another process's lock on the
	// file. Default 1s.
	LockTimeout time.Duration
	// MaxBatch is the most write requests grouped in one transaction.
	// Default 1024.
	MaxBatch int
	// AuditKeep is how many audit events are kept; the oldest are trimmed in
	// the transaction that appends past it. Default 1_000_000.
	AuditKeep int
	// Logger receives the store's rare diagnostics. Default zerolog.Nop().
	Logger zerolog.Logger
	// MustExist makes Open fail (with fs.ErrNotExist) rather than create
	// a missing file: a tool checking a copy must not check an empty
	// database made in its place. Default false.
	MustExist bool
	// OnCommit, when set, is called by the writer after each group commit
	// with how long the transaction took (fsync included), how many
	// requests it held and, for a commit that failed (a full disk, an I/O
	// error), the error every request in it got. It runs on the writer
	// goroutine, so it must not block. Default none.
	OnCommit func(d time.Duration, requests int, err error)
}

func (o *Options) setDefaults() {
	if o.LockTimeout <= 0 {
		o.LockTimeout = time.Second
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 1024
	}
	if o.AuditKeep <= 0 {
		o.AuditKeep = 1_000_000
	}
	// The zero zerolog.Logger has no writer and is disabled, exactly like
	// zerolog.Nop(), so it needs no default.
}

// DB is an open store. Its methods are safe for concurrent use.
type DB struct {
	bolt      *bbolt.DB
	log       zerolog.Logger
	auditKeep int
	maxBatch  int

	// mu guards closed. Readers and submitters hold it shared for the length
	// of their call so that Close, which takes it exclusively, never closes
	// the channel under a sender nor the file under a reader.
	mu     sync.RWMutex
	closed bool

	reqs       chan *request
	writerDone chan struct{}
	onCommit   func(time.Duration, int, error)

	// counts is the telemetry message count of each device, as
	// PruneTelemetry keeps it; countsMu serializes PruneTelemetry.
	countsMu sync.Mutex
	counts   map[string]countMark

	// damaged is the first ErrDamaged met after Open (see Damaged).
	damaged atomic.Pointer[error]

	// groupHook, when set (tests only), is called by the writer with the
	// number of requests in each group it commits.
	groupHook func(n int)
}

// Open opens or creates the store at path.
func Open(path string, opts Options) (*DB, error) {
	opts.setDefaults()
	bopts := &bbolt.Options{Timeout: opts.LockTimeout}
	if opts.MustExist {
		bopts.OpenFile = func(name string, flag int, mode os.FileMode) (*os.File, error) {
			return os.OpenFile(name, flag&^os.O_CREATE, mode)
		}
	}
	var bdb *bbolt.DB
	err := guard(func() (err error) {
		bdb, err = bbolt.Open(path, 0o600, bopts)
		return err
	})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: another process (probably a running fleetmq) holds the file: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	// bbolt only applies the mode when it creates the file; an older file
	// may have been created or copied with looser permissions.
	if err := os.Chmod(path, 0o600); err != nil {
		_ = bdb.Close()
		return nil, fmt.Errorf("open store %s: chmod: %w", path, err)
	}
	if err := guard(func() error { return initSchema(bdb) }); err != nil {
		_ = bdb.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	db := &DB{
		bolt:       bdb,
		log:        opts.Logger,
		auditKeep:  opts.AuditKeep,
		maxBatch:   opts.MaxBatch,
		reqs:       make(chan *request, opts.MaxBatch),
		writerDone: make(chan struct{}),
		counts:     make(map[string]countMark),
		onCommit:   opts.OnCommit,
	}
	go db.writeLoop()
	return db, nil
}

// ErrDamaged means bbolt met a page it cannot read: the file was cut
// short or overwritten.
var ErrDamaged = errors.New("the database file is damaged")

// guard runs fn, turning a panic or a memory fault inside bbolt into
// ErrDamaged: bbolt trusts its file and panics (or reads past the end of
// the mapping, a fault) on a truncated or overwritten one, which would
// otherwise kill the process with a stack dump.
func guard(fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w (%v): stop fleetmq and restore fleetmq.db from a backup", ErrDamaged, r)
		}
	}()
	return fn()
}

// initSchema refuses a file of a newer layout, or another program's,
// before changing anything in it, then creates missing buckets and records
// the version.
func initSchema(bdb *bbolt.DB) error {
	err := bdb.View(func(tx *bbolt.Tx) error {
		v, err := readSchema(tx)
		if err != nil || v != 0 {
			return err
		}
		// Every fleetmq store records its version in the transaction that
		// creates its buckets: buckets without it are another program's
		// data, which a fleet must not be written into.
		return tx.ForEach(func(name []byte, _ *bbolt.Bucket) error {
			return fmt.Errorf("the file holds data (bucket %q) but no fleetmq schema version: it is not a fleetmq database; "+
				"give fleetmq a data folder of its own: %w", name, ErrSchema)
		})
	})
	if err != nil {
		return err
	}
	return bdb.Update(func(tx *bbolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return fmt.Errorf("create bucket %s: %w", name, err)
			}
		}
		v, err := readSchema(tx)
		if err != nil {
			return err
		}
		// Schema 1 whether indexed or not: an older fleetmq reads an
		// indexed store as before, and what it revokes is indexed here.
		if err := indexRevocations(tx); err != nil {
			return err
		}
		if err := indexBoundTokens(tx); err != nil {
			return err
		}
		if v == 0 {
			return tx.Bucket(bucketMeta).Put(keySchema, []byte(strconv.Itoa(schemaVersion)))
		}
		return nil
	})
}

// readSchema returns the recorded version, 0 for a new file.
func readSchema(tx *bbolt.Tx) (int, error) {
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		return 0, nil
	}
	raw := meta.Get(keySchema)
	if raw == nil {
		return 0, nil
	}
	v, err := strconv.Atoi(string(raw))
	if err != nil || v < 1 {
		return 0, fmt.Errorf("schema version %q is not a number: %w", raw, ErrSchema)
	}
	if v > schemaVersion {
		return 0, fmt.Errorf("schema version %d is newer than %d, the newest this fleetmq supports; upgrade fleetmq: %w", v, schemaVersion, ErrSchema)
	}
	return v, nil
}

// Close stops accepting writes, commits those already queued, waits for the
// writer and closes the file. Later calls return ErrClosed.
func (db *DB) Close() error {
	db.mu.Lock()
	if db.closed {
		db.mu.Unlock()
		return ErrClosed
	}
	db.closed = true
	close(db.reqs)
	db.mu.Unlock()
	<-db.writerDone
	if err := db.bolt.Close(); err != nil {
		return fmt.Errorf("close store: %w", err)
	}
	return nil
}

// Check verifies the file's consistency and returns the first problem found,
// as ErrDamaged. It runs on the writer goroutine, between groups: bbolt's
// check of a read transaction reads the freelist, which a concurrent commit
// would change.
func (db *DB) Check() error {
	return db.exclusive(context.Background(), func() error {
		return db.guard(func() error {
			return db.bolt.View(func(tx *bbolt.Tx) error {
				// bbolt's check reads pages on a goroutine of its own, where a
				// page number past the end of the file is a memory fault that
				// kills the process. Reading every page here first, under the
				// guard, meets such damage where it can be answered.
				if err := readAll(tx); err != nil {
					return err
				}
				var first error
				for err := range tx.Check() { // drain: the checker goroutine blocks on send
					if first == nil {
						first = err
					}
				}
				if first != nil {
					return fmt.Errorf("%w (%v): stop fleetmq and restore fleetmq.db from a backup", ErrDamaged, first)
				}
				return nil
			})
		})
	})
}

// readAll reads every key and value of every bucket of tx, which reads
// every page the check will.
func readAll(tx *bbolt.Tx) error {
	var sum uint32
	var walk func(b *bbolt.Bucket) error
	walk = func(b *bbolt.Bucket) error {
		return b.ForEach(func(k, v []byte) error {
			if v == nil {
				if nested := b.Bucket(k); nested != nil {
					return walk(nested)
				}
			}
			// Touching every byte reads the value's overflow pages too.
			sum = crc32.Update(sum, crc32.IEEETable, v)
			return nil
		})
	}
	return tx.ForEach(func(_ []byte, b *bbolt.Bucket) error { return walk(b) })
}

// view runs fn in a read transaction, concurrently with other readers and
// with the writer.
func (db *DB) view(ctx context.Context, fn func(tx *bbolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	db.mu.RLock()
	defer db.mu.RUnlock()
	if db.closed {
		return ErrClosed
	}
	return db.guard(func() error { return db.bolt.View(fn) })
}

// guard is the package guard for a transaction of an open store: damage
// met there is also remembered (see Damaged).
func (db *DB) guard(fn func() error) error {
	err := guard(fn)
	if errors.Is(err, ErrDamaged) {
		if db.damaged.CompareAndSwap(nil, &err) {
			db.log.Error().Err(err).Msg("store: damaged page; writes refused until the file is restored")
		}
	}
	return err
}

// Damaged returns the first damage met in the file since Open, or nil.
// From then on every write is refused with it: a B-tree that cannot be
// read is no place to add to. Reads of undamaged pages still work.
func (db *DB) Damaged() error {
	if p := db.damaged.Load(); p != nil {
		return *p
	}
	return nil
}

func putJSON(b *bbolt.Bucket, key []byte, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	if err := b.Put(key, raw); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// getJSON decodes the value at key into v and reports whether it existed.
func getJSON(b *bbolt.Bucket, key []byte, v any) (bool, error) {
	raw := b.Get(key)
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return true, fmt.Errorf("decode %s: %w", key, err)
	}
	return true, nil
}
