package enroll

import (
	"errors"
	"regexp"
	"strings"
	"testing"
)

// idPattern is the documented rule, stated independently of the code.
var idPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

func TestValidateIDGood(t *testing.T) {
	for _, id := range []string{
		"a", "0", "dev1", "pi-kitchen.2", "a_b", "a-", "a.", "a..b", "0.0.0",
		strings.Repeat("a", 64), "9" + strings.Repeat("-", 63),
	} {
		if err := ValidateID(id); err != nil {
			t.Errorf("ValidateID(%q) = %v, want nil", id, err)
		}
	}
}

func TestValidateIDBad(t *testing.T) {
	tests := []struct {
		name string
		id   string
		rule string // part of the message naming the rule
	}{
		{"empty", "", "empty"},
		{"65 chars", strings.Repeat("a", 65), "at most 64"},
		{"huge", strings.Repeat("a", 1<<20), "at most 64"},
		{"slash", "a/b", "position 2"},
		{"plus", "+", "start"},
		{"hash", "#", "start"},
		{"plus inside", "a+b", "position 2"},
		{"hash at end", "dev#", "position 4"},
		{"upper first", "Dev", "lower case"},
		{"upper inside", "devA", "lower case"},
		{"space", "a b", "position 2"},
		{"leading dot", ".a", "start"},
		{"leading dash", "-a", "start"},
		{"leading underscore", "_a", "start"},
		{"dot only", ".", "start"},
		{"dot dot", "..", "start"},
		{"nul", "dev\x00", "position 4"},
		{"newline", "dev\n", "position 4"},
		{"cyrillic e", "d\u0435v", "position 2"},
		{"fullwidth a", "\uff41", "start"},
		{"colon", "a:b", "position 2"},
		{"dollar", "$sys", "start"},
		{"mochi's inline client", "inline", "reserved"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateID(tt.id)
			var e *Error
			if !errors.As(err, &e) || e.Code != CodeIDInvalid {
				t.Fatalf("ValidateID = %v, want code %s", err, CodeIDInvalid)
			}
			if !strings.Contains(e.Message, tt.rule) {
				t.Errorf("message %q does not name the rule (%q)", e.Message, tt.rule)
			}
			if len(tt.id) >= 3 && strings.Contains(err.Error(), tt.id) {
				t.Errorf("message %q echoes the input", err)
			}
		})
	}
}

func FuzzValidateID(f *testing.F) {
	for _, s := range []string{"", "a", "dev-1", "Dev", "a/b", "+", "#", ".a", "d\u0435v", strings.Repeat("a", 64), strings.Repeat("a", 65), "a\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		err := ValidateID(id)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Code != CodeIDInvalid {
				t.Fatalf("err = %v, want code %s", err, CodeIDInvalid)
			}
			if idPattern.MatchString(id) && id != "inline" {
				t.Fatalf("rejected an id that matches the pattern: %v", err)
			}
			return
		}
		if !idPattern.MatchString(id) {
			t.Fatalf("accepted %q, which does not match the pattern", id)
		}
		if strings.ContainsAny(id, "/+#") || strings.ToLower(id) != id {
			t.Fatalf("accepted %q with an MQTT wildcard, separator or upper case", id)
		}
	})
}
