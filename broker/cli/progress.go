package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
)

// progress draws a one-line progress bar on a terminal. It is only made
// for a terminal (see newProgress): in a pipe or a log a redrawn line is
// noise.
type progress struct {
	w     io.Writer
	what  string
	total int
	start time.Time
	now   func() time.Time
	width int // of the bar, in cells
}

// newProgress returns a bar on w for total items, or nil when w is not a
// terminal. A nil *progress draws nothing.
func newProgress(w io.Writer, what string, total int) *progress {
	f, ok := w.(*os.File)
	if !ok || !(isatty.IsTerminal(f.Fd()) || isatty.IsCygwinTerminal(f.Fd())) {
		return nil
	}
	return &progress{w: w, what: what, total: total, start: time.Now(), now: time.Now, width: 30}
}

// set draws the bar at done items.
func (p *progress) set(done int) {
	if p == nil {
		return
	}
	fmt.Fprint(p.w, "\r"+p.line(done))
}

// finish ends the bar's line.
func (p *progress) finish() {
	if p == nil {
		return
	}
	fmt.Fprintln(p.w)
}

// line renders the bar at done items, e.g.
// "minting tokens [===========>          ]  4000/10000  40%  2.1s".
func (p *progress) line(done int) string {
	done = min(max(done, 0), p.total)
	frac := 1.0
	if p.total > 0 {
		frac = float64(done) / float64(p.total)
	}
	filled := int(frac * float64(p.width))
	bar := strings.Repeat("=", filled)
	if filled < p.width {
		bar += ">" + strings.Repeat(" ", p.width-filled-1)
	}
	return fmt.Sprintf("%s [%s] %*d/%d %3d%%  %s", p.what, bar, len(fmt.Sprint(p.total)), done, p.total,
		int(frac*100), p.now().Sub(p.start).Round(100*time.Millisecond))
}
