package server_test

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestESTToBroker is the README's EST walkthrough: openssl makes the key and
// CSR, curl enrolls over EST with the token as the Basic password, openssl
// reads the PKCS#7 answer, and mosquitto_pub connects with the result; then
// re-enrollment with curl's --cert/--key, and the new certificate connects too.
func TestESTToBroker(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	tok := s.token(t, "--device", "est-7")
	run(t, "curl", "-sSfk", "-o", p("ca.pem"), s.url("/v1/ca"))

	enrollEST := func(key, op string, auth ...string) string {
		run(t, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
			"-keyout", p(key+".key"), "-subj", "/CN=est-7", "-outform", "DER", "-out", p(key+".csr.der"))
		run(t, "openssl", "base64", "-in", p(key+".csr.der"), "-out", p(key+".csr.b64"))
		args := append([]string{"-sSf", "--cacert", p("ca.pem"), "-H", "Content-Type: application/pkcs10",
			"--data-binary", "@" + p(key+".csr.b64"), "-o", p(key + ".p7.b64")}, auth...)
		run(t, "curl", append(args, s.url("/.well-known/est/"+op))...)
		run(t, "openssl", "base64", "-d", "-in", p(key+".p7.b64"), "-out", p(key+".p7"))
		run(t, "openssl", "pkcs7", "-inform", "DER", "-in", p(key+".p7"), "-print_certs", "-out", p(key+".pem"))
		return p(key + ".pem")
	}
	publish := func(key string) {
		out, err := s.mosq(t, "mosquitto_pub", "--cafile", p("ca.pem"), "--cert", p(key+".pem"), "--key", p(key+".key"),
			"-i", "est-7", "-q", "1", "-t", "devices/est-7/telemetry", "-m", `{"via":"`+key+`"}`)
		if err != nil {
			t.Fatalf("mosquitto_pub with the EST certificate %s: %v %s", key, err, out)
		}
	}

	enrollEST("first", "simpleenroll", "-u", "est-7:"+tok)
	publish("first")
	enrollEST("second", "simplereenroll", "--cert", p("first.pem"), "--key", p("first.key"))
	publish("second")

	out, _, _ := s.cli(t, "telemetry", "est-7", "--json")
	if !strings.Contains(out, `{"via":"first"}`) || !strings.Contains(out, `{"via":"second"}`) {
		t.Fatalf("telemetry from EST certificates missing:\n%s", out)
	}
}
