package ui

// LoginCode hands out a login code, as Login does, for tests
// whose server is not listening (httptest serves its Handler).
func LoginCode(s *Server) (string, error) { return s.login.issue(s.cfg.Now()) }

// CodeSpans is codeSpans, for its table test.
var CodeSpans = codeSpans
