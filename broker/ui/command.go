package ui

import (
	"net/http"
	"strings"
	"time"

	"github.com/fleetmq/fleetmq/broker/admin"
	"github.com/fleetmq/fleetmq/enroll"
	"github.com/fleetmq/fleetmq/store"
)

// commandWait is how long the device page waits for a command's reply:
// a device on a working link answers a ping in well under a second.
const commandWait = 5 * time.Second

// commandOutcome is what the device page shows of a command it sent.
type commandOutcome struct {
	Name, Payload string // as typed, to fill the form again
	Error         string // why it was not sent
	Topic         string
	Online        bool
	Reply         *store.Message
	ReplyText     string
	Waited        time.Duration
	Disconnected  bool // the device left before a reply came
}

// commandDevice sends the command of the device page's form, through the
// admin API as `fleetmq device command --wait 5s` does, and shows the
// device page with the outcome. A refusal (not connected, a name that
// cannot be a command) is shown there too, with the form as typed.
func (s *Server) commandDevice(w http.ResponseWriter, r *http.Request) {
	out := &commandOutcome{Name: strings.TrimSpace(r.PostFormValue("name")), Payload: r.PostFormValue("payload"), Waited: commandWait}
	req := admin.CommandRequest{Name: out.Name, Payload: out.Payload, Wait: commandWait.String()}
	res, err := s.cfg.Admin.Command(r.Context(), r.PathValue("id"), req, viewerOf(r.Context()).Remote)
	status := http.StatusOK
	if err != nil {
		e := enroll.AsError(err)
		if e.Code == enroll.CodeNotFound || e.Status() >= 500 {
			s.failErr(w, r, err)
			return
		}
		status = e.Status()
		if e.Code == enroll.CodeDeviceRevoked {
			status = http.StatusConflict // see failErr
		}
		out.Error = e.Message
		s.renderDevice(w, r, status, out)
		return
	}
	out.Topic, out.Online, out.Disconnected = res.Topic, res.Online, res.Disconnected
	if m := res.ReplyMessage; m != nil {
		out.Reply, out.ReplyText = m, payloadText(m.Payload)
	}
	s.renderDevice(w, r, status, out)
}
