//go:build !linux

package main

import (
	"os"
	"strconv"
)

// resizeSignals tell that the terminal's size changed: none known here.
var resizeSignals []os.Signal

// isTerminal tells whether f is a terminal, or at least a character
// device.
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// terminalSize is the size $COLUMNS and $LINES give, 0 when unset: the
// terminal itself is asked on Linux only.
func terminalSize(*os.File) (width, height int) {
	width, _ = strconv.Atoi(os.Getenv("COLUMNS"))
	height, _ = strconv.Atoi(os.Getenv("LINES"))
	return max(width, 0), max(height, 0)
}
