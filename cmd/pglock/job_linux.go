package main

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

// sysProcAttr starts CMD in a process group of its own unless foreground,
// with SIGKILL as its parent-death signal.
func sysProcAttr(foreground bool) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: !foreground, Pdeathsig: syscall.SIGKILL}
}

// becomeSubreaper makes pglock the child subreaper of its descendants
// (PR_SET_CHILD_SUBREAPER): orphans become its children, not init's.
func becomeSubreaper() error {
	const prSetChildSubreaper = 36
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
		return errno
	}
	return nil
}

// reapGroup waits for every exited child of pglock in process group pgid,
// without blocking.
func reapGroup(pgid int) {
	const pPGID, wExited, wNoHang = 2, 4, 1
	for {
		var info [128]byte // siginfo_t; si_pid at offset 16 on Linux
		_, _, errno := syscall.Syscall6(syscall.SYS_WAITID, pPGID, uintptr(pgid),
			uintptr(unsafe.Pointer(&info[0])), wExited|wNoHang, 0, 0)
		if errno != 0 || *(*int32)(unsafe.Pointer(&info[16])) == 0 {
			return
		}
	}
}

// groupRuns reports whether a process of group pgid is alive and not a
// zombie, reading /proc; when /proc cannot be read it answers true (the
// caller then relies on kill(-pgid, 0) alone).
func groupRuns(pgid int) bool {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return true
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // gone meanwhile
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces and parens.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 3 || f[2] != strconv.Itoa(pgid) {
			continue
		}
		if f[0] != "Z" && f[0] != "X" {
			return true
		}
	}
	return false
}

// selfExe is the path that runs pglock again, even if its file was
// replaced or removed since it started.
func selfExe() string { return "/proc/self/exe" }
