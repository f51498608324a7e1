package enroll

import (
	"errors"
	"fmt"
	"net/http"
	"syscall"

	"github.com/fleetmq/fleetmq/store"
)

// Code is a stable, public error code. Clients branch on it; never rename one.
type Code string

// Public error codes. The HTTP status of each is in statusByCode, the one table.
const (
	CodeBadRequest       Code = "bad_request"
	CodeBodyTooLarge     Code = "body_too_large"
	CodeHeaderTooLarge   Code = "header_too_large"
	CodeUnsupportedMedia Code = "unsupported_media_type"
	CodeNotFound         Code = "not_found"
	CodeMethod           Code = "method_not_allowed"
	CodeCSRInvalid       Code = "csr_invalid"
	CodeKeyUnsupported   Code = "key_unsupported"
	CodeIDInvalid        Code = "id_invalid"
	CodeIDMismatch       Code = "id_mismatch"
	CodeIDTaken          Code = "id_taken"
	CodeIDHasToken       Code = "id_has_token"
	CodeTokenMissing     Code = "token_missing"
	CodeTokenInvalid     Code = "token_invalid"
	CodeTokenUnknown     Code = "token_unknown"
	CodeTokenExpired     Code = "token_expired"
	CodeTokenUsed        Code = "token_used"
	CodeTokenRevoked     Code = "token_revoked"
	CodeCertRequired     Code = "cert_required"
	CodeCertInvalid      Code = "cert_invalid"
	CodeCertExpired      Code = "cert_expired"
	CodeCertRevoked      Code = "cert_revoked"
	CodeDeviceRevoked    Code = "device_revoked"
	CodeDeviceOffline    Code = "device_offline"
	CodeProofInvalid     Code = "proof_invalid"
	CodeRateLimited      Code = "rate_limited"
	CodeUnavailable      Code = "unavailable"
	CodeInternal         Code = "internal"
)

var statusByCode = map[Code]int{
	CodeBadRequest:       http.StatusBadRequest,
	CodeBodyTooLarge:     http.StatusRequestEntityTooLarge,
	CodeHeaderTooLarge:   http.StatusRequestHeaderFieldsTooLarge,
	CodeUnsupportedMedia: http.StatusUnsupportedMediaType,
	CodeNotFound:         http.StatusNotFound,
	CodeMethod:           http.StatusMethodNotAllowed,
	CodeCSRInvalid:       http.StatusBadRequest,
	CodeKeyUnsupported:   http.StatusBadRequest,
	CodeIDInvalid:        http.StatusBadRequest,
	CodeIDMismatch:       http.StatusForbidden,
	CodeIDTaken:          http.StatusConflict,
	CodeIDHasToken:       http.StatusConflict,
	CodeTokenMissing:     http.StatusUnauthorized,
	CodeTokenInvalid:     http.StatusUnauthorized,
	CodeTokenUnknown:     http.StatusUnauthorized,
	CodeTokenExpired:     http.StatusUnauthorized,
	CodeTokenUsed:        http.StatusUnauthorized,
	CodeTokenRevoked:     http.StatusUnauthorized,
	CodeCertRequired:     http.StatusUnauthorized,
	CodeCertInvalid:      http.StatusUnauthorized,
	CodeCertExpired:      http.StatusUnauthorized,
	CodeCertRevoked:      http.StatusForbidden,
	CodeDeviceRevoked:    http.StatusForbidden,
	CodeDeviceOffline:    http.StatusConflict,
	CodeProofInvalid:     http.StatusUnauthorized,
	CodeRateLimited:      http.StatusTooManyRequests,
	CodeUnavailable:      http.StatusServiceUnavailable,
	CodeInternal:         http.StatusInternalServerError,
}

// storeCodes maps the store's sentinels to public codes.
var storeCodes = []struct {
	err  error
	code Code
}{
	{store.ErrTokenUnknown, CodeTokenUnknown},
	{store.ErrTokenExpired, CodeTokenExpired},
	{store.ErrTokenUsed, CodeTokenUsed},
	{store.ErrTokenRevoked, CodeTokenRevoked},
	{store.ErrTokenBound, CodeIDMismatch},
	{store.ErrIDRevoked, CodeIDTaken}, // before ErrDeviceExists, which it wraps
	{store.ErrDeviceExists, CodeIDTaken},
	{store.ErrTokenLive, CodeIDHasToken},
	{store.ErrDeviceRevoked, CodeDeviceRevoked},
	{store.ErrCertUnknown, CodeCertInvalid},
	{store.ErrCertRevoked, CodeCertRevoked},
	{store.ErrCertMismatch, CodeIDMismatch},
	{store.ErrNotFound, CodeNotFound},
}

// Error is an error with a public code and message. Err, the internal cause,
// is logged but never sent to a client.
type Error struct {
	Code    Code
	Message string
	Err     error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %s: %v", e.Code, e.Message, e.Err)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// Status is the HTTP status for the error's code.
func (e *Error) Status() int { return StatusOf(e.Code) }

// Errorf returns an *Error with code and a formatted public message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// StatusOf returns the HTTP status of code; unknown codes are 500.
func StatusOf(code Code) int {
	if s, ok := statusByCode[code]; ok {
		return s
	}
	return http.StatusInternalServerError
}

// AsError turns any error into an *Error: an *Error in the chain is kept, a
// store sentinel gets its code, and anything else becomes internal with a
// generic message so that no internal detail reaches a client.
func AsError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	for _, sc := range storeCodes {
		if errors.Is(err, sc.err) {
			return &Error{Code: sc.code, Message: sc.err.Error(), Err: err}
		}
	}
	if DiskFull(err) {
		// Not the client's fault nor a bug, and over once space is freed:
		// the client should come back later.
		return &Error{Code: CodeUnavailable, Message: "the server cannot store anything now; try again later", Err: err}
	}
	// Over once the operator acts, as a full disk; the message is for
	// whoever passes it on to them.
	switch {
	case errors.Is(err, ErrCAExpired):
		return &Error{Code: CodeUnavailable, Err: err,
			Message: "the server's CA has expired, so it issues no certificates: its operator must renew the CA (fleetmq README: Renewing or replacing the CA); try again later"}
	case errors.Is(err, ErrClockBeforeCA):
		return &Error{Code: CodeUnavailable, Err: err,
			Message: "the server's clock is before its CA's validity, so it issues no certificates: its operator must set the clock; try again later"}
	}
	return &Error{Code: CodeInternal, Message: "internal error", Err: err}
}

// DiskFull reports whether err comes from a full disk, an exhausted quota or
// the process's file size limit: writes that fail until space is freed.
func DiskFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, syscall.EFBIG)
}
