package enroll

import (
	"net/http"
	"slices"
	"sync"
	"testing"
)

func TestObserveCallsOncePerRequest(t *testing.T) {
	var mu sync.Mutex
	var got []string
	e := newESTEnv(t, estOptions{mutate: func(c *Config) {
		c.FailureBurst = 2
		c.FailureRate = 0.001
		c.Observe = func(op, result string) {
			mu.Lock()
			got = append(got, op+":"+result)
			mu.Unlock()
		}
	}})
	c := e.client(t, nil)
	key := genP256(t)
	cert := e.enroll(t, e.mintToken(t, "pi-1", 1), key, "pi-1")
	hdr := map[string]string{"Content-Type": "application/pkcs10"}
	rep := e.do(t, e.client(t, tlsCert(cert, key)), http.MethodPost, "/.well-known/est/simplereenroll", hdr, estBase64Body(estCSR(t, key, "pi-1")))
	wantESTCert(t, rep, key.Public())

	v1 := map[string]string{"Content-Type": "application/pkcs10", "Authorization": "Bearer nope"}
	if rep := e.do(t, c, http.MethodPost, "/v1/enroll", v1, estCSR(t, key, "pi-2")); rep.status != http.StatusUnauthorized {
		t.Fatalf("bad token: %d", rep.status)
	}
	if rep := e.do(t, c, http.MethodPost, "/v1/renew", hdr, estCSR(t, key, "pi-1")); rep.status != http.StatusUnauthorized {
		t.Fatalf("renew without a certificate: %d", rep.status)
	}
	// Two failures used the burst: the next request is refused unread.
	if rep := e.do(t, c, http.MethodPost, "/v1/enroll", v1, estCSR(t, key, "pi-2")); rep.status != http.StatusTooManyRequests {
		t.Fatalf("over the limit: %d", rep.status)
	}

	want := []string{
		"enroll:ok", "renew:ok", "enroll:" + string(CodeTokenInvalid),
		"renew:" + string(CodeCertRequired), "enroll:" + string(CodeRateLimited),
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(got, want) {
		t.Fatalf("Observe calls\n got %q\nwant %q", got, want)
	}
}
