package broker

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// memChildEnv makes the test binary run a broker for
// BenchmarkIdleConnectionMemory instead of the tests: its value is the
// number of devices to enroll.
const memChildEnv = "FLEETMQ_BROKER_MEMORY_CHILD"

func TestMain(m *testing.M) {
	if n := os.Getenv(memChildEnv); n != "" {
		if err := memoryChild(n); err != nil {
			fmt.Fprintln(os.Stderr, "memory child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type childCerts struct {
	CA      []byte      `json:"ca"` // DER
	Devices []childCert `json:"devices"`
}

type childCert struct {
	ID   string `json:"id"`
	Cert []byte `json:"cert"` // DER
	Key  []byte `json:"key"`  // PKCS#8 DER
}

// memUsage is the broker process's memory, in bytes.
type memUsage struct {
	Heap, Stack, RSS uint64
}

func measureMemory() (memUsage, error) {
	// Each collection may halve goroutine stacks that use little of theirs
	// (the TLS handshake grew them).
	for range 4 {
		runtime.GC()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	u := memUsage{Heap: ms.HeapInuse, Stack: ms.StackInuse}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return u, err
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return u, err
			}
			u.RSS = kb << 10
		}
	}
	return u, nil
}

// memoryChild enrolls n devices, starts a broker, and reports its memory
// before and after the parent has connected them:
//
//	stdout: <addr> <certs.json> <baseline JSON>
//	stdin:  "measure"  ->  stdout: <JSON>
//	stdin:  EOF        ->  exit
func memoryChild(nstr string) error {
	n, err := strconv.Atoi(nstr)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "fleetmq-mem-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ca, err := enroll.LoadOrCreateCA(enroll.CAConfig{Dir: filepath.Join(dir, "ca")})
	if err != nil {
		return err
	}
	serverCert, err := ca.IssueServer([]string{"127.0.0.1"}, time.Hour)
	if err != nil {
		return err
	}
	db, err := store.Open(filepath.Join(dir, "fleet.db"), store.Options{})
	if err != nil {
		return err
	}
	defer db.Close()

	certs := make([]childCert, n)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range certs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			c, err := enrollChild(ca, db, fmt.Sprintf("mem-%d", i))
			if err != nil {
				errs <- err
				return
			}
			certs[i] = c
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	certsPath := filepath.Join(dir, "certs.json")
	data, err := json.Marshal(childCerts{CA: ca.Cert().Raw, Devices: certs})
	if err != nil {
		return err
	}
	if err := os.WriteFile(certsPath, data, 0o600); err != nil {
		return err
	}

	b, err := New(Config{
		Addr:           "127.0.0.1:0",
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &serverCert, nil },
		ClientCAs:      ca.Pool(),
		MaxConnections: n + 100,
		Logger:         zerolog.Nop(),
	}, db)
	if err != nil {
		return err
	}
	if err := b.Start(); err != nil {
		return err
	}
	defer b.Close()
	base, err := measureMemory()
	if err != nil {
		return err
	}
	baseJSON, _ := json.Marshal(base)
	fmt.Printf("%s %s %s\n", b.Addr(), certsPath, baseJSON)

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if in.Text() != "measure" {
			continue
		}
		u, err := measureMemory()
		if err != nil {
			return err
		}
		if s := b.Stats().Sessions; s != n {
			return fmt.Errorf("%d sessions, want %d", s, n)
		}
		out, _ := json.Marshal(u)
		fmt.Printf("%s\n", out)
	}
	return in.Err()
}

func enrollChild(ca *enroll.CA, db *store.DB, id string) (childCert, error) {
	ctx := context.Background()
	now := time.Now()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return childCert{}, err
	}
	leaf, err := ca.IssueDevice(&key.PublicKey, id, time.Hour)
	if err != nil {
		return childCert{}, err
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return childCert{}, err
	}
	hash := sha256.Sum256(secret)
	tok := store.Token{ID: hex.EncodeToString(hash[:6]), Hash: hash, MaxUses: 1, ExpiresAt: now.Add(time.Hour)}
	if err := db.CreateTokens(ctx, []store.Token{tok}, "bench", now); err != nil {
		return childCert{}, err
	}
	err = db.Enroll(ctx, store.Enrollment{
		TokenHash: hash,
		Device:    store.Device{ID: id},
		Cert:      store.Cert{Serial: enroll.SerialHex(leaf.SerialNumber), DeviceID: id, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter, DER: leaf.Raw},
		Remote:    "bench",
		Now:       now,
	})
	if err != nil {
		return childCert{}, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return childCert{}, err
	}
	return childCert{ID: id, Cert: leaf.Raw, Key: der}, nil
}

// BenchmarkIdleConnectionMemory connects 2000 devices (one certificate
// each) to a broker in a child process, so that only the broker's memory
// is measured, and reports the growth per idle connection. It ignores b.N
// and takes seconds, so the framework does not repeat it: run it with
// -benchtime 1x.
func BenchmarkIdleConnectionMemory(b *testing.B) {
	const n = 2000
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), memChildEnv+"="+strconv.Itoa(n))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = stdin.Close()
		if err := cmd.Wait(); err != nil {
			b.Errorf("child: %v", err)
		}
	}()
	out := bufio.NewScanner(stdout)
	if !out.Scan() {
		b.Fatalf("child said nothing: %v", out.Err())
	}
	fields := strings.Fields(out.Text())
	if len(fields) != 3 {
		b.Fatalf("child said %q", out.Text())
	}
	addr, certsPath := fields[0], fields[1]
	var base memUsage
	if err := json.Unmarshal([]byte(fields[2]), &base); err != nil {
		b.Fatal(err)
	}
	data, err := os.ReadFile(certsPath)
	if err != nil {
		b.Fatal(err)
	}
	var cc childCerts
	if err := json.Unmarshal(data, &cc); err != nil {
		b.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(cc.CA)
	if err != nil {
		b.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(caCert)
	certs := cc.Devices

	conns := make([]*tls.Conn, len(certs))
	var wg sync.WaitGroup
	errs := make(chan error, len(certs))
	sem := make(chan struct{}, 16)
	for i, c := range certs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			key, err := x509.ParsePKCS8PrivateKey(c.Key)
			if err != nil {
				errs <- err
				return
			}
			cfg := &tls.Config{
				Certificates: []tls.Certificate{{Certificate: [][]byte{c.Cert}, PrivateKey: key}},
				RootCAs:      roots,
				ServerName:   "127.0.0.1",
			}
			conn, _, err := mqttConnect(addr, cfg, connectPacket(b, c.ID))
			if err != nil {
				errs <- err
				return
			}
			conns[i] = conn
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	if _, err := fmt.Fprintln(stdin, "measure"); err != nil {
		b.Fatal(err)
	}
	if !out.Scan() {
		b.Fatalf("child did not measure: %v", errors.Join(out.Err(), errors.New("see its stderr")))
	}
	var after memUsage
	if err := json.Unmarshal(out.Bytes(), &after); err != nil {
		b.Fatalf("child said %q: %v", out.Text(), err)
	}
	per := func(a, z uint64) float64 { return (float64(z) - float64(a)) / n }
	b.ReportMetric(per(base.Heap, after.Heap), "heap-B/conn")
	b.ReportMetric(per(base.Stack, after.Stack), "stack-B/conn")
	b.ReportMetric(per(base.RSS, after.RSS), "rss-B/conn")
}
