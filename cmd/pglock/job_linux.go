package main

import (
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

// selfExe is the path that runs pglock again, even if its file was
// replaced or removed since it started.
func selfExe() string { return "/proc/self/exe" }
