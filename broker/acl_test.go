package broker

import (
	"strings"
	"testing"
	"unicode"

	"github.com/fleetmq/fleetmq/store"
)

func TestAllowed(t *testing.T) {
	const (
		pub = true
		sub = false
	)
	dev, svc, op := store.RoleDevice, store.RoleService, store.RoleOperator
	tests := []struct {
		role  store.Role
		id    string
		topic string
		write bool
		want  bool
	}{
		// Device publishes.
		{dev, "d1", "devices/d1/telemetry", pub, true},
		{dev, "d1", "devices/d1/telemetry/temp", pub, true},
		{dev, "d1", "devices/d1/telemetry/a/b/c", pub, true},
		{dev, "d1", "devices/d1/events/boot", pub, true},
		{dev, "d1", "devices/d1/events", pub, false},
		{dev, "d1", "devices/d1/status", pub, true},
		{dev, "d1", "devices/d1/status/x", pub, false},
		{dev, "d1", "devices/d1/commands/reboot", pub, false},
		{dev, "d1", "devices/d1/config", pub, false},
		{dev, "d1", "devices/d2/telemetry", pub, false},
		{dev, "d1", "devices/d1", pub, false},
		{dev, "d1", "devices/d1/", pub, false},
		{dev, "d1", "devices/d1/telemetry/", pub, false},
		{dev, "d1", "devices/d1//telemetry", pub, false},
		{dev, "d1", "devices/d1/telemetry/+", pub, false},
		{dev, "d1", "devices/d1/telemetry/#", pub, false},
		{dev, "d1", "devices/+/telemetry", pub, false},
		{dev, "d1", "$SYS/broker/uptime", pub, false},
		{dev, "d1", "other/d1/telemetry", pub, false},
		{dev, "d1", "Devices/d1/telemetry", pub, false},
		{dev, "d1", "", pub, false},
		{dev, "d1", "devices/d1/telemetry/\x00", pub, false},
		{dev, "d1", "devices/d1/telemetry/\xff", pub, false},
		{dev, "d1", "devices/d1/telemetry/\x1b[31mred", pub, false},
		{dev, "d1", "devices/d1/telemetry/a\nb", pub, false},
		{dev, "d1", "devices/d1/telemetry/\u0085", pub, false},
		{dev, "d1", "devices/d1/telemetry/\uffff", pub, false},
		{dev, "d1", "devices/d1/telemetry/\ufdd0", pub, false},
		{dev, "d1", "devices/d1/telemetry/température", pub, true},
		{dev, "d1", "devices/d1/telemetry/" + strings.Repeat("a", maxTopicLen-len("devices/d1/telemetry/")), pub, true},
		{dev, "d1", "devices/d1/telemetry/" + strings.Repeat("a", maxTopicLen-len("devices/d1/telemetry/")+1), pub, false},
		// Device subscriptions and deliveries.
		{dev, "d1", "devices/d1/commands/#", sub, true},
		{dev, "d1", "devices/d1/commands/+", sub, true},
		{dev, "d1", "devices/d1/commands/reboot", sub, true},
		{dev, "d1", "devices/d1/commands/+/now", sub, true},
		{dev, "d1", "devices/d1/commands", sub, false},
		{dev, "d1", "devices/d1/config", sub, true},
		{dev, "d1", "devices/d1/config/#", sub, false},
		{dev, "d1", "devices/d1/#", sub, false},
		{dev, "d1", "devices/d1/+", sub, false},
		{dev, "d1", "devices/d1/+/reboot", sub, false},
		{dev, "d1", "devices/+/commands/#", sub, false},
		{dev, "d1", "devices/d2/commands/#", sub, false},
		{dev, "d1", "devices/d1/telemetry", sub, false},
		{dev, "d1", "devices/d1/commands/#/x", sub, false},
		{dev, "d1", "devices/d1/commands/a#", sub, false},
		{dev, "d1", "devices/d1/commands/a+", sub, false},
		{dev, "d1", "#", sub, false},
		{dev, "d1", "+/d1/commands/#", sub, false},
		{dev, "d1", "devices/#", sub, false},
		{dev, "d1", "$share/g/devices/d1/commands/#", sub, false},
		{dev, "d1", "$SYS/#", sub, false},
		// Bad identity names never get anything.
		{dev, "", "devices//telemetry", pub, false},
		{dev, "+", "devices/+/telemetry", pub, false},
		{dev, "+", "devices/+/commands/#", sub, false},
		{dev, "#", "devices/#", sub, false},
		{dev, "a/b", "devices/a/b/telemetry", pub, false},
		{dev, "$x", "devices/$x/telemetry", pub, false},
		// Service subscriptions and deliveries.
		{svc, "s1", "devices/+/telemetry/#", sub, true},
		{svc, "s1", "devices/+/telemetry", sub, true},
		{svc, "s1", "devices/+/telemetry/+", sub, true},
		{svc, "s1", "devices/d1/telemetry/#", sub, true},
		{svc, "s1", "devices/d1/telemetry/temp", sub, true},
		{svc, "s1", "devices/+/status", sub, true},
		{svc, "s1", "devices/d1/status", sub, true},
		{svc, "s1", "devices/+/status/#", sub, false},
		{svc, "s1", "devices/+/events/#", sub, true},
		{svc, "s1", "devices/d1/events/boot", sub, true},
		{svc, "s1", "devices/+/commands/#", sub, false},
		{svc, "s1", "devices/d1/commands/reboot", sub, false},
		{svc, "s1", "devices/+/config", sub, false},
		{svc, "s1", "devices/+/+/#", sub, false},
		{svc, "s1", "devices/#", sub, false},
		{svc, "s1", "#", sub, false},
		{svc, "s1", "+/+/telemetry/#", sub, false},
		{svc, "s1", "$share/g/devices/+/telemetry/#", sub, false},
		{svc, "s1", "$SYS/#", sub, false},
		// Service publishes.
		{svc, "s1", "devices/d1/commands/reboot", pub, true},
		{svc, "s1", "devices/d1/commands/a/b", pub, true},
		{svc, "s1", "devices/d1/commands", pub, false},
		{svc, "s1", "devices/+/commands/reboot", pub, false},
		{svc, "s1", "devices/d1/telemetry", pub, false},
		{svc, "s1", "devices/d1/config", pub, false},
		{svc, "s1", "devices/d1/status", pub, false},
		{svc, "s1", "devices/$d/commands/x", pub, false},
		// Operators and unknown roles have no MQTT access.
		{op, "o1", "devices/+/telemetry/#", sub, false},
		{op, "o1", "devices/d1/commands/reboot", pub, false},
		{"", "d1", "devices/d1/telemetry", pub, false},
		{"admin", "d1", "devices/d1/telemetry", pub, false},
	}
	for _, tt := range tests {
		if got := Allowed(tt.role, tt.id, tt.topic, tt.write); got != tt.want {
			t.Errorf("Allowed(%q, %q, %q, write=%v) = %v, want %v", tt.role, tt.id, tt.topic, tt.write, got, tt.want)
		}
	}
}

// matches reports whether the MQTT filter matches the concrete topic.
func matches(filter, topic string) bool {
	f, t := strings.Split(filter, "/"), strings.Split(topic, "/")
	for i, lv := range f {
		if lv == "#" {
			return true
		}
		if i >= len(t) || (lv != "+" && lv != t[i]) {
			return false
		}
	}
	return len(f) == len(t)
}

func FuzzAllowed(f *testing.F) {
	for _, s := range []struct {
		role  string
		id    string
		topic string
		write bool
	}{
		{"device", "d1", "devices/d1/telemetry", true},
		{"device", "d1", "devices/d1/commands/#", false},
		{"device", "d1", "devices/d1/config", false},
		{"device", "d1", "devices/+/commands/#", false},
		{"device", "d1", "#", false},
		{"device", "d1", "$share/g/devices/d1/commands/#", false},
		{"device", "+", "devices/+/commands/#", false},
		{"device", "d1/commands", "devices/d1/commands/x", true},
		{"service", "s1", "devices/+/telemetry/#", false},
		{"service", "s1", "devices/d1/commands/x", true},
		{"service", "s1", "devices/+/commands/x", true},
		{"operator", "o1", "devices/d1/telemetry", false},
	} {
		f.Add(s.role, s.id, s.topic, s.write)
	}
	f.Fuzz(func(t *testing.T, role, id, topic string, write bool) {
		ok := Allowed(store.Role(role), id, topic, write)
		if !ok {
			return
		}
		if topic == "" || topic[0] == '$' {
			t.Fatalf("granted $ or empty topic %q", topic)
		}
		if len(topic) > maxTopicLen || strings.IndexFunc(topic, unicode.IsControl) >= 0 {
			t.Fatalf("granted an over-long topic or one with control characters %q", topic)
		}
		if strings.Contains(topic, "//") || strings.HasSuffix(topic, "/") {
			t.Fatalf("granted topic with an empty level %q", topic)
		}
		hasWildcard := strings.ContainsAny(topic, "+#")
		if write && hasWildcard {
			t.Fatalf("granted publish to wildcard %q", topic)
		}
		switch store.Role(role) {
		case store.RoleDevice:
			prefix := "devices/" + id + "/"
			if !strings.HasPrefix(topic, prefix) || strings.ContainsAny(id, "/+#") {
				t.Fatalf("device %q granted %q outside %s", id, topic, prefix)
			}
			if hasWildcard && !strings.HasPrefix(topic, prefix+"commands/") {
				t.Fatalf("device %q granted wildcard %q outside its command tree", id, topic)
			}
			// A granted filter must not match another device's topics.
			other := "devices/" + id + "x/commands/a"
			if matches(topic, other) {
				t.Fatalf("device %q filter %q matches %q", id, topic, other)
			}
			// Within its tree, only the documented grant.
			rest := strings.Split(strings.TrimPrefix(topic, prefix), "/")
			switch {
			case write && rest[0] == "telemetry":
			case write && rest[0] == "events" && len(rest) > 1:
			case write && rest[0] == "status" && len(rest) == 1:
			case !write && rest[0] == "commands" && len(rest) > 1:
			case !write && rest[0] == "config" && len(rest) == 1:
			default:
				t.Fatalf("device %q granted %q (write %v) outside telemetry, events, status, commands and config", id, topic, write)
			}
		case store.RoleService:
			lv := strings.Split(topic, "/")
			if lv[0] != "devices" || len(lv) < 3 {
				t.Fatalf("service granted %q outside devices/", topic)
			}
			if write && lv[2] != "commands" {
				t.Fatalf("service granted publish to %q", topic)
			}
			if !write && (lv[2] == "commands" || lv[2] == "config") {
				t.Fatalf("service granted subscription to %q", topic)
			}
		default:
			t.Fatalf("role %q granted %q", role, topic)
		}
	})
}
