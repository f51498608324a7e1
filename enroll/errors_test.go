package enroll

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/store"
)

// TestErrorTable pins the public contract: every code's HTTP status. A
// change here breaks clients that branch on codes.
func TestErrorTable(t *testing.T) {
	want := map[Code]int{
		CodeBadRequest: 400, CodeCSRInvalid: 400, CodeKeyUnsupported: 400, CodeIDInvalid: 400,
		CodeTokenMissing: 401, CodeTokenInvalid: 401, CodeTokenUnknown: 401, CodeTokenExpired: 401,
		CodeTokenUsed: 401, CodeTokenRevoked: 401, CodeCertRequired: 401, CodeCertInvalid: 401,
		CodeCertExpired: 401, CodeProofInvalid: 401,
		CodeIDMismatch: 403, CodeCertRevoked: 403, CodeDeviceRevoked: 403,
		CodeNotFound: 404, CodeMethod: 405, CodeIDTaken: 409, CodeIDHasToken: 409, CodeDeviceOffline: 409,
		CodeBodyTooLarge: 413, CodeUnsupportedMedia: 415, CodeHeaderTooLarge: 431,
		CodeRateLimited: 429, CodeInternal: 500, CodeUnavailable: 503,
	}
	if len(want) != len(statusByCode) {
		t.Fatalf("table has %d codes, test pins %d: pin the new code here", len(statusByCode), len(want))
	}
	for code, status := range want {
		if got := StatusOf(code); got != status {
			t.Errorf("%s: status %d, want %d", code, got, status)
		}
	}
	if got := StatusOf("no_such_code"); got != 500 {
		t.Errorf("unknown code: %d, want 500", got)
	}
}

func TestAsError(t *testing.T) {
	internal := errors.New("open /var/lib/secret.db: permission denied")
	cases := []struct {
		name string
		err  error
		code Code
	}{
		{"typed error kept", Errorf(CodeIDInvalid, "bad id"), CodeIDInvalid},
		{"typed error wrapped", fmt.Errorf("context: %w", Errorf(CodeCSRInvalid, "x")), CodeCSRInvalid},
		{"token used", fmt.Errorf("enroll: %w", store.ErrTokenUsed), CodeTokenUsed},
		{"token unknown", store.ErrTokenUnknown, CodeTokenUnknown},
		{"token expired", store.ErrTokenExpired, CodeTokenExpired},
		{"token revoked", store.ErrTokenRevoked, CodeTokenRevoked},
		{"token bound", store.ErrTokenBound, CodeIDMismatch},
		{"device exists", store.ErrDeviceExists, CodeIDTaken},
		{"device revoked", store.ErrDeviceRevoked, CodeDeviceRevoked},
		{"cert unknown", store.ErrCertUnknown, CodeCertInvalid},
		{"cert revoked", store.ErrCertRevoked, CodeCertRevoked},
		{"cert mismatch", store.ErrCertMismatch, CodeIDMismatch},
		{"not found", store.ErrNotFound, CodeNotFound},
		{"disk full", fmt.Errorf("commit: %w", &fs.PathError{Op: "write", Path: "/data/fleetmq.db", Err: syscall.ENOSPC}), CodeUnavailable},
		{"quota", &fs.PathError{Op: "write", Path: "/data/fleetmq.db", Err: syscall.EDQUOT}, CodeUnavailable},
		{"CA expired", fmt.Errorf("issue certificate: %w at 2036-03-01T12:00:00Z", ErrCAExpired), CodeUnavailable},
		{"clock before the CA", fmt.Errorf("issue certificate: %w", ErrClockBeforeCA), CodeUnavailable},
		{"anything else", internal, CodeInternal},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := AsError(c.err)
			if e.Code != c.code {
				t.Fatalf("code %s, want %s", e.Code, c.code)
			}
			if !errors.Is(e, c.err) && c.code != CodeIDInvalid && c.code != CodeCSRInvalid {
				t.Errorf("cause lost: %v", e)
			}
		})
	}
	if AsError(nil) != nil {
		t.Error("AsError(nil) != nil")
	}
}

// TestWriteErrorHidesInternals checks the wire format and that an internal
// cause never reaches the client.
func TestWriteErrorHidesInternals(t *testing.T) {
	rec := httptest.NewRecorder()
	WriteError(rec, AsError(errors.New("bbolt: page 42 corrupt at /data/fleetmq.db")))
	if rec.Code != http.StatusInternalServerError || strings.Contains(rec.Body.String(), "bbolt") || strings.Contains(rec.Body.String(), "/data") {
		t.Fatalf("internal error answer: %d %s", rec.Code, rec.Body)
	}
	var body struct{ Code, Message string }
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Code != "internal" || body.Message == "" {
		t.Fatalf("body %q: %v", rec.Body, err)
	}

	rec = httptest.NewRecorder()
	WriteError(rec, rateLimited(1500e6))
	if rec.Code != 429 || rec.Header().Get("Retry-After") != "2" {
		t.Fatalf("rate limited: %d Retry-After=%q", rec.Code, rec.Header().Get("Retry-After"))
	}
}

// TestRetryAfter: a 429 says when the address may try again, and a 503 (the
// server cannot store, its disk full, say) asks for a minute, over the
// JSON API and EST alike; other errors say nothing.
func TestRetryAfter(t *testing.T) {
	for _, tc := range []struct {
		err  *Error
		want string
	}{
		{rateLimited(7 * time.Second), "7"},
		{&Error{Code: CodeUnavailable, Message: "disk is full"}, "60"},
		{&Error{Code: CodeInternal, Message: "boom"}, ""},
		{&Error{Code: CodeTokenUnknown, Message: "no such token"}, ""},
	} {
		for name, write := range map[string]func(http.ResponseWriter, *Error){"json": WriteError, "est": writeESTError} {
			rec := httptest.NewRecorder()
			write(rec, tc.err)
			if got := rec.Header().Get("Retry-After"); got != tc.want || rec.Code != tc.err.Status() {
				t.Errorf("%s %s: %d, Retry-After %q; want %d, %q", name, tc.err.Code, rec.Code, got, tc.err.Status(), tc.want)
			}
		}
	}
}
