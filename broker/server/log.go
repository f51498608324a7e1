package server

import (
	"log"
	"strings"

	"github.com/rs/zerolog"
)

// newHTTPErrorLog routes net/http's own messages (TLS handshake errors,
// mostly scanners and clients without our CA) to zerolog at debug level, so
// they neither spam the log nor disappear.
func newHTTPErrorLog(l zerolog.Logger) *log.Logger {
	return log.New(httpLogWriter{l}, "", 0)
}

type httpLogWriter struct{ l zerolog.Logger }

func (w httpLogWriter) Write(p []byte) (int, error) {
	w.l.Debug().Str("component", "http").Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
