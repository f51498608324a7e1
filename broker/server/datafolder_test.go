package server_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fleetmq/fleetmq/broker/server"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// stopped starts a node with a device, stops it and returns its config,
// ready for server.New on the same data folder.
func stopped(t *testing.T) server.Config {
	t.Helper()
	s := startServer(t)
	s.enroll(t, s.token(t), "pi-df")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	cfg := s.cfg
	cfg.EnrollAddr, cfg.MQTTAddr = "127.0.0.1:0", "127.0.0.1:0"
	return cfg
}

// newRefused runs server.New, which must fail with an error matching want.
func newRefused(t *testing.T, cfg server.Config, want ...string) error {
	t.Helper()
	srv, err := server.New(cfg)
	if err == nil {
		srv.Close()
		t.Fatal("the server started")
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("error %q does not say %q", err, w)
		}
	}
	return err
}

// TestLostDatabaseRefused: a data folder whose database is gone or empty
// while its CA is there lost its fleet. The server refuses to start as a
// new, empty fleet (which would turn every device away and send its agent
// to enroll again), changes nothing, and serves the fleet once the
// database is put back.
func TestLostDatabaseRefused(t *testing.T) {
	cfg := stopped(t)
	dbPath := filepath.Join(cfg.DataDir, server.DBName)
	saved, err := os.ReadFile(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	for name, lose := range map[string]func() error{
		"missing": func() error { return os.Remove(dbPath) },
		"empty":   func() error { return os.WriteFile(dbPath, nil, 0o600) },
	} {
		t.Run(name, func(t *testing.T) {
			if err := lose(); err != nil {
				t.Fatal(err)
			}
			before, _ := os.Stat(dbPath)
			err := newRefused(t, cfg, "missing or empty", "from a backup", "ca.pem")
			if !errors.Is(err, server.ErrDatabaseLost) {
				t.Fatalf("error %q is not ErrDatabaseLost", err)
			}
			after, _ := os.Stat(dbPath)
			if (before == nil) != (after == nil) || after != nil && after.Size() != 0 {
				t.Fatalf("the refused start changed the database file: %v -> %v", before, after)
			}
		})
	}

	if err := os.WriteFile(dbPath, saved, 0o600); err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(cfg)
	if err != nil {
		t.Fatalf("with the database put back: %v", err)
	}
	defer srv.Close()
	if has, err := srv.Store().HasIdentities(t.Context()); err != nil || !has {
		t.Fatalf("the fleet is not back: %v %v", has, err)
	}
}

// TestLostDatabaseAndCertRefused: a folder that kept only the CA's key lost
// its fleet as well. The server refuses without creating a database, which
// the next start would serve as a new, empty fleet once ca.pem is back.
func TestLostDatabaseAndCertRefused(t *testing.T) {
	cfg := stopped(t)
	dbPath := filepath.Join(cfg.DataDir, server.DBName)
	for _, p := range []string{dbPath, filepath.Join(cfg.DataDir, "ca.pem")} {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
	if err := newRefused(t, cfg, "missing or empty", "from a backup"); !errors.Is(err, server.ErrDatabaseLost) {
		t.Fatalf("error %q is not ErrDatabaseLost", err)
	}
	if _, err := os.Stat(dbPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused start created the database: %v", err)
	}
}

// TestKilledBackupFolderRefused: serving the folder of a backup killed
// mid-copy (it holds fleetmq.db.partial) would start a new fleet; the
// server refuses, says what the file is, and creates nothing.
func TestKilledBackupFolderRefused(t *testing.T) {
	data := filepath.Join(t.TempDir(), "backup")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(data, server.DBName+".partial"), []byte("torn"), 0o600); err != nil {
		t.Fatal(err)
	}
	newRefused(t, server.Config{DataDir: data, EnrollAddr: "127.0.0.1:0", MQTTAddr: "127.0.0.1:0"},
		"unfinished copy of a fleetmq backup that was killed", "delete")
	if entries, err := os.ReadDir(data); err != nil || len(entries) != 1 {
		t.Fatalf("the refused start wrote into the folder: %v %v", entries, err)
	}
}

// TestRefusedStartWritesNoCA: a fleet with tokens minted but nobody
// enrolled yet has lost its CA. The tokens pin that CA, so the server
// refuses to start, and writes no new CA into the folder on the way.
func TestRefusedStartWritesNoCA(t *testing.T) {
	s := startServer(t)
	s.token(t, "--device", "pi-later")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	cfg := s.cfg
	cfg.EnrollAddr, cfg.MQTTAddr = "127.0.0.1:0", "127.0.0.1:0"
	for _, name := range []string{"ca.pem", "ca.key"} {
		if err := os.Remove(filepath.Join(cfg.DataDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := newRefused(t, cfg, "put back the data folder's ca.pem and ca.key"); !errors.Is(err, enroll.ErrNoCA) {
		t.Fatalf("error %q is not ErrNoCA", err)
	}
	for _, name := range []string{"ca.pem", "ca.key"} {
		if _, err := os.Stat(filepath.Join(cfg.DataDir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the refused start wrote %s: %v", name, err)
		}
	}
}

// TestUnboundStoreRefusesAnotherCA: a store written before fleetmq
// recorded its CA is bound at its first start. Started first with a CA
// that signed none of its certificates (the operator CA of another fleet,
// say), the server refuses and binds nothing: the fleet's own CA is still
// served afterwards, and bound from then on.
func TestUnboundStoreRefusesAnotherCA(t *testing.T) {
	cfg := stopped(t)
	unbindCA(t, filepath.Join(cfg.DataDir, server.DBName))
	other := t.TempDir()
	if _, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: other}); err != nil {
		t.Fatal(err)
	}
	wrong := cfg
	wrong.CACertFile, wrong.CAKeyFile = filepath.Join(other, "ca.pem"), filepath.Join(other, "ca.key")
	if err := newRefused(t, wrong, "signed none of the certificates", "--ca-cert"); !errors.Is(err, store.ErrCAMismatch) {
		t.Fatalf("error %q is not ErrCAMismatch", err)
	}

	srv, err := server.New(cfg)
	if err != nil {
		t.Fatalf("with the fleet's own CA after the refusal: %v", err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := newRefused(t, wrong, "were issued by the CA key"); !errors.Is(err, store.ErrCAMismatch) {
		t.Fatalf("error %q is not ErrCAMismatch", err)
	}
}

// unbindCA removes the store's record of its CA, as in a store written by
// fleetmq before it kept one.
func unbindCA(t *testing.T, path string) {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bbolt.Tx) error {
		meta := tx.Bucket([]byte("meta"))
		if meta.Get([]byte("ca_key")) == nil {
			return errors.New("the store records no CA: the key name changed?")
		}
		return meta.Delete([]byte("ca_key"))
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestLongDataFolderRefused: a data folder whose admin socket path the
// kernel would refuse is refused by New before anything is created, not
// by Start with a bare "bind: invalid argument" after a new fleet's CA
// and database. The longest path that works is served.
func TestLongDataFolderRefused(t *testing.T) {
	tmp := t.TempDir()
	fits := func(extra int) string {
		n := 107 - len(tmp+"/"+"/admin.sock") + extra // 107: sun_path less its NUL
		if n < 1 {
			t.Skipf("temporary folder %s is too long for this test", tmp)
		}
		return filepath.Join(tmp, strings.Repeat("d", n))
	}
	long := fits(1)
	newRefused(t, server.Config{DataDir: long, EnrollAddr: "127.0.0.1:0", MQTTAddr: "127.0.0.1:0"},
		"admin socket", "108 bytes", "shorter data folder path")
	if _, err := os.Stat(long); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused start created the data folder: %v", err)
	}
	startServer(t, func(c *server.Config) { c.DataDir = fits(0) })
}
