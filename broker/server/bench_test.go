package server_test

import (
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/broker/server"
)

// BenchmarkEnroll measures enrollments through the real HTTPS endpoint: TLS
// (kept alive), token check, CSR signature check, signing, and the durable
// commit, with 16 concurrent clients. CSRs are made before the timer starts:
// their cost is the device's, not the server's.
func BenchmarkEnroll(b *testing.B) {
	s := startServer(b, func(c *server.Config) { c.Enroll.FailureBurst = 1 << 20 })
	tok := s.token(b, "--uses", "1000000", "--ttl", "1h")
	csrs := make([][]byte, b.N)
	for i := range csrs {
		csrs[i] = csrPEM(b, newKey(b), fmt.Sprintf("bench-%07d", i))
	}
	var next atomic.Int64
	b.SetParallelism(8) // 16 clients on 2 cores
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		c := s.client(nil)
		for pb.Next() {
			i := next.Add(1) - 1
			a := s.post(b, c, "/v1/enroll", bearer(tok), csrs[i])
			if a.status != http.StatusCreated {
				b.Errorf("enroll: %d %s", a.status, a.body)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "enrollments/s")
}
