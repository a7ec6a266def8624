package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"
)

const (
	defaultWatch = time.Second            // --watch without DUR, as watch(1)
	minWatch     = 100 * time.Millisecond // watch(1)'s floor too
)

// watchFlag is --watch [DUR]. It is a boolean flag, so "--watch" alone
// parses; parseStatus takes a DUR that follows it as its value.
type watchFlag struct {
	every time.Duration
	set   bool
}

func (f *watchFlag) IsBoolFlag() bool { return true }

func (f *watchFlag) String() string {
	if f == nil || !f.set {
		return ""
	}
	return f.every.String()
}

func (f *watchFlag) Set(s string) error {
	switch s {
	case "true":
		f.every, f.set = defaultWatch, true
		return nil
	case "false":
		f.set = false
		return nil
	}
	d, err := parseDuration(s)
	if err != nil {
		return err
	}
	if d < minWatch {
		return fmt.Errorf("want at least %v", minWatch)
	}
	f.every, f.set = d, true
	return nil
}

// watchStatus shows a reading every interval until SIGINT, SIGTERM or
// SIGHUP, then returns 0. A reading that fails is shown in its frame, and
// the next one connects again. It returns 1 only when stdout cannot be
// written.
func watchStatus(src *statusSource, v *statusView, every time.Duration, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	scr := newScreen(stdout, v.json)
	resized := make(chan os.Signal, 1)
	if len(resizeSignals) > 0 && scr.tty {
		signal.Notify(resized, resizeSignals...)
		defer signal.Stop(resized)
	}
	title := fmt.Sprintf("Every %v: pglock status on %s/%s", every, hostPort(src.cfg), src.cfg.Database)
	if v.what != "" {
		title += " " + v.what
	}
	title = oneLine(src.cn.redact(title))
	if err := scr.start(); err != nil {
		return watchWriteError(stderr, err)
	}
	defer scr.stop()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		frame, err := v.frame(ctx, src)
		if ctx.Err() != nil {
			return exitOK
		}
		if err != nil {
			frame = []byte(fmt.Sprintf("pglock: %s\n(trying again every %v)\n", err, every))
		}
		if err := scr.draw(title, frame); err != nil {
			return watchWriteError(stderr, err)
		}
		select {
		case <-ctx.Done():
			return exitOK
		case <-tick.C:
		case <-resized:
		}
	}
}

func watchWriteError(stderr io.Writer, err error) int {
	fmt.Fprintln(stderr, "pglock: writing the status:", err)
	return exitFailure
}

// frame takes one reading and renders it: the table, or one line of JSON.
func (v *statusView) frame(ctx context.Context, src *statusSource) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	snap, err := src.read(ctx)
	if err != nil {
		return nil, err
	}
	if v.json {
		b, err := json.Marshal(v.jsonValue(snap))
		return append(b, '\n'), err
	}
	var buf bytes.Buffer
	err = v.writeTable(&buf, snap)
	return buf.Bytes(), err
}

// Escape sequences of the terminal screen (ECMA-48 and xterm's, which every
// terminal emulator in use understands).
const (
	enterAltScreen = "\x1b[?1049h" // save the screen and show a blank one
	leaveAltScreen = "\x1b[?1049l" // restore the saved screen
	hideCursor     = "\x1b[?25l"
	showCursor     = "\x1b[?25h"
	clearLine      = "\x1b[2K"
	clearBelow     = "\x1b[J"
)

// screen shows frames: redrawn in place on a terminal, as watch(1) does;
// else one after another, each after a header with the time and followed
// by a blank line, without escape codes.
type screen struct {
	w     io.Writer
	f     *os.File // stdout when it is a file, for the terminal's size
	tty   bool
	lines bool // --json: each frame is one line, no header
}

func newScreen(w io.Writer, jsonLines bool) *screen {
	s := &screen{w: w, lines: jsonLines}
	if f, ok := w.(*os.File); ok {
		s.f = f
		s.tty = isTerminal(f) && !jsonLines
	}
	return s
}

func (s *screen) start() error {
	if !s.tty {
		return nil
	}
	_, err := io.WriteString(s.w, enterAltScreen+hideCursor)
	return err
}

// stop gives the terminal back as it was.
func (s *screen) stop() {
	if s.tty {
		_, _ = io.WriteString(s.w, showCursor+leaveAltScreen)
	}
}

// draw shows one frame.
func (s *screen) draw(title string, frame []byte) error {
	now := time.Now().Format("2006-01-02 15:04:05")
	if s.lines {
		_, err := s.w.Write(frame)
		return err
	}
	if !s.tty {
		_, err := fmt.Fprintf(s.w, "%s  %s\n\n%s\n", title, now, frame)
		return err
	}
	width, height := terminalSize(s.f)
	header := title + "  " + now
	if pad := width - utf8.RuneCountInString(header); width > 0 && pad > 0 {
		header = title + strings.Repeat(" ", pad) + now // the time at the right, as watch(1)
	}
	lines := append([]string{header, ""}, strings.Split(strings.TrimSuffix(string(frame), "\n"), "\n")...)
	if height > 0 && len(lines) > height {
		hidden := len(lines) - height + 1
		lines = append(lines[:height-1], fmt.Sprintf("… %d more lines: a taller terminal, or --key, shows them", hidden))
	}
	var b strings.Builder
	for i, l := range lines {
		// Each line at its row, cleared first: a full-width line then
		// leaves no pending wrap to scroll the screen or eat a character.
		fmt.Fprintf(&b, "\x1b[%d;1H%s%s", i+1, clearLine, cut(l, width))
	}
	if height <= 0 || len(lines) < height {
		fmt.Fprintf(&b, "\x1b[%d;1H%s", len(lines)+1, clearBelow)
	}
	_, err := io.WriteString(s.w, b.String())
	return err
}

// cut shortens s to width characters; width 0 means unknown: no cut.
func cut(s string, width int) string {
	if width <= 0 || utf8.RuneCountInString(s) <= width {
		return s
	}
	r := []rune(s)
	return string(r[:width])
}
