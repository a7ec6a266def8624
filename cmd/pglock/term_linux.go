//go:build linux

package main

import (
	"os"
	"syscall"
	"unsafe"
)

// resizeSignals tell that the terminal's size changed.
var resizeSignals = []os.Signal{syscall.SIGWINCH}

// isTerminal tells whether f is a terminal.
func isTerminal(f *os.File) bool {
	_, _, ok := winsize(f)
	return ok
}

// terminalSize is f's size in characters, 0 and 0 when unknown.
func terminalSize(f *os.File) (width, height int) {
	width, height, _ = winsize(f)
	return width, height
}

// winsize asks the terminal f for its size (TIOCGWINSZ); ok is false when f
// is not a terminal.
func winsize(f *os.File) (width, height int, ok bool) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, 0, false
	}
	var (
		ws    struct{ row, col, xpixel, ypixel uint16 }
		errno syscall.Errno
	)
	err = rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCGWINSZ, uintptr(unsafe.Pointer(&ws)))
	})
	if err != nil || errno != 0 {
		return 0, 0, false
	}
	return int(ws.col), int(ws.row), true
}
