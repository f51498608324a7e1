package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/csv"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// mintTokens creates one bootstrap token per device through the operator
// CLI, as an operator would, and returns the device ids and their tokens.
func mintTokens(ctx context.Context, f *fleetmqProc, dir string, n int) ([]string, map[string]string, error) {
	path := filepath.Join(dir, "tokens.csv")
	if _, err := f.cli(ctx, "token", "create", "--count", strconv.Itoa(n), "--prefix", "bench-",
		"--ttl", "2h", "--csv", path); err != nil {
		return nil, nil, err
	}
	file, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer file.Close()
	rows, err := csv.NewReader(file).ReadAll()
	if err != nil {
		return nil, nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(rows) != n+1 {
		return nil, nil, fmt.Errorf("%s has %d tokens, want %d", path, len(rows)-1, n)
	}
	ids := make([]string, 0, n)
	toks := make(map[string]string, n)
	for _, r := range rows[1:] {
		ids = append(ids, r[0])
		toks[r[0]] = r[1]
	}
	return ids, toks, nil
}

// enrollAll enrolls every device through POST /v1/enroll with its token,
// from workers concurrent clients with kept-alive HTTPS connections, and
// returns the enrollments per second.
func enrollAll(ctx context.Context, addr string, p *pki, devs []*device, toks map[string]string, workers int) (float64, error) {
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: p.pool, ServerName: "127.0.0.1"},
		MaxIdleConnsPerHost: workers,
		ForceAttemptHTTP2:   false,
	}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	url := "https://" + addr + "/v1/enroll"
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	start := time.Now()
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(devs) || ctx.Err() != nil {
					return
				}
				if err := enrollOne(ctx, hc, url, devs[i], toks[devs[i].id]); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := errors.Join(ctx.Err(), <-errs); err != nil {
		return 0, err
	}
	return float64(len(devs)) / elapsed.Seconds(), nil
}

func enrollOne(ctx context.Context, hc *http.Client, url string, d *device, token string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(d.csr))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/pkcs10")
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("enroll %s: %w", d.id, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("enroll %s: %w", d.id, err)
	}
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("enroll %s: %s: %s", d.id, resp.Status, body)
	}
	var r struct {
		Certificate string `json:"certificate"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return fmt.Errorf("enroll %s: %w", d.id, err)
	}
	block, _ := pem.Decode([]byte(r.Certificate))
	if block == nil {
		return fmt.Errorf("enroll %s: no certificate in the answer", d.id)
	}
	return d.setCert(block.Bytes)
}
