package admin

import (
	"errors"
	"testing"
	"time"

	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// TestCommandOutcome: what a command to many devices reports for each,
// from what the broker did; a broker that could not take the command
// (stopping) is not reported as a device that is away.
func TestCommandOutcome(t *testing.T) {
	offline := enroll.Errorf(enroll.CodeDeviceOffline, "x")
	pong := &store.Message{Topic: "devices/d/events/pong"}
	refusal := &store.Message{Topic: "devices/d/events/error"}
	for _, tc := range []struct {
		s    Sent
		wait time.Duration
		want string
	}{
		{Sent{Err: offline}, 0, OutcomeNotConnected},
		{Sent{Err: offline, Online: true}, 0, OutcomeNotSubscribed},
		{Sent{Err: errors.New("broker: closed"), Online: true}, 0, OutcomeFailed},
		{Sent{Online: true}, 0, OutcomeSent},
		{Sent{}, 0, OutcomeQueued},
		{Sent{Online: true, Reply: pong}, time.Second, OutcomeReplied},
		{Sent{Online: true, Reply: refusal}, time.Second, OutcomeRefused},
		{Sent{Online: true, Gone: true}, time.Second, OutcomeDisconnected},
		{Sent{Online: true}, time.Second, OutcomeNoReply},
	} {
		if got := commandOutcome("d", tc.s, tc.wait); got != tc.want {
			t.Errorf("%+v, wait %s: %s, want %s", tc.s, tc.wait, got, tc.want)
		}
	}
}
