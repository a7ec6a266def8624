package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// localServer is the state of a server run from local binaries in a
// temporary directory: data/ holds the cluster, postgres.log the server log,
// and the directory itself the unix socket.
type localServer struct {
	dir      string
	binDir   string
	runuser  string // path of runuser when running as root, else ""
	port     int
	settings map[string]string
}

func (l *localServer) dataDir() string { return filepath.Join(l.dir, "data") }
func (l *localServer) logFile() string { return filepath.Join(l.dir, "postgres.log") }
func (l *localServer) pidFile() string { return filepath.Join(l.dataDir(), "postmaster.pid") }

// startLocal runs initdb in a new temporary directory and starts the
// server on a free loopback port.
func startLocal(ctx context.Context, settings map[string]string) (*Server, error) {
	return newLocal(ctx, settings, func(l *localServer) error {
		return l.run(ctx, "initdb", "-D", l.dataDir(), "-U", "postgres", "--auth=trust",
			"-E", "UTF8", "--locale=C", "--no-sync")
	})
}

// newLocal creates a temporary directory, has makeData fill its data
// directory (initdb, or a base backup), and starts the server on a free
// loopback port. On failure nothing is left running and the directory is
// removed.
func newLocal(ctx context.Context, settings map[string]string, makeData func(*localServer) error) (*Server, error) {
	binDir, err := findBinDir()
	if err != nil {
		return nil, err
	}
	l := &localServer{binDir: binDir, settings: maps.Clone(settings)}
	var uid, gid int
	if os.Geteuid() == 0 {
		// PostgreSQL refuses to run as root.
		if l.runuser, err = exec.LookPath("runuser"); err != nil {
			return nil, fmt.Errorf("running as root needs runuser to start PostgreSQL as user postgres: %w", err)
		}
		if uid, gid, err = lookupIDs("postgres"); err != nil {
			return nil, fmt.Errorf("running as root needs a user named postgres: %w", err)
		}
	}
	if l.dir, err = os.MkdirTemp("", "pgtest-"); err != nil {
		return nil, err
	}
	s := &Server{Host: "127.0.0.1", source: SourceLocal, local: l}
	ok := false
	defer func() {
		if !ok {
			_ = s.Stop()
		}
	}()
	if l.runuser != "" {
		if err := os.Chown(l.dir, uid, gid); err != nil {
			return nil, err
		}
	}
	if err := makeData(l); err != nil {
		return nil, err
	}
	// The watchdog stops the server and removes the directory if this
	// process dies without calling Stop.
	script := "if [ -f " + shellQuote(l.pidFile()) + " ]; then " +
		shellJoin(l.argv("pg_ctl", "stop", "-D", l.dataDir(), "-m", "immediate", "-w")) + "; fi; " +
		"rm -rf " + shellQuote(l.dir)
	if s.reaper, err = startReaper(script); err != nil {
		return nil, err
	}
	// A free port can be taken by someone else before the server binds
	// it, so retry with a new port when the bind fails.
	for attempt := 1; ; attempt++ {
		if l.port, err = freePort(); err != nil {
			return nil, err
		}
		_ = os.Remove(l.logFile())
		err = l.pgCtlStart(ctx)
		if err == nil {
			break
		}
		if attempt == 3 || ctx.Err() != nil || !strings.Contains(err.Error(), "could not bind") {
			return nil, err
		}
	}
	s.Port = l.port
	s.DSN = loopbackDSN(l.port)
	ok = true
	return s, nil
}

// restart stops the server (fast mode) if it runs and starts it again.
func (l *localServer) restart(ctx context.Context) error {
	if fileExists(l.pidFile()) {
		if err := l.pgCtlStop(ctx, "fast"); err != nil {
			return err
		}
	}
	return l.pgCtlStart(ctx)
}

// stop stops the server (immediate mode) if it runs and removes the
// temporary directory, also when stopping fails.
func (l *localServer) stop() error {
	var err error
	if fileExists(l.pidFile()) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err = l.pgCtlStop(ctx, "immediate")
		cancel()
	}
	return errors.Join(err, os.RemoveAll(l.dir))
}

// pgCtlStart starts the server on l.port and waits until it accepts
// connections. On failure it stops a half-started server and returns an
// error that includes the tail of the server log.
func (l *localServer) pgCtlStart(ctx context.Context) error {
	opts := []string{
		"-p", strconv.Itoa(l.port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories=" + l.dir,
		"-c", "fsync=off",
	}
	opts = append(opts, settingArgs(l.settings)...)
	// pg_ctl hands -o to /bin/sh, hence the quoting.
	err := l.run(ctx, "pg_ctl", "start", "-D", l.dataDir(), "-l", l.logFile(),
		"-w", "-t", strconv.Itoa(waitSeconds(ctx)), "-o", shellJoin(opts))
	if err == nil {
		return nil
	}
	if fileExists(l.pidFile()) {
		stopCtx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_ = l.pgCtlStop(stopCtx, "immediate")
		cancel()
	}
	return fmt.Errorf("%w\nserver log (tail):\n%s", err, tailFile(l.logFile(), 20))
}

// pgCtlStop stops the server in the given shutdown mode and waits until it
// is gone.
func (l *localServer) pgCtlStop(ctx context.Context, mode string) error {
	return l.run(ctx, "pg_ctl", "stop", "-D", l.dataDir(), "-m", mode,
		"-w", "-t", strconv.Itoa(waitSeconds(ctx)))
}

// argv returns the command line that runs the named PostgreSQL program,
// through runuser when running as root.
func (l *localServer) argv(name string, args ...string) []string {
	argv := []string{filepath.Join(l.binDir, name)}
	if l.runuser != "" {
		argv = append([]string{l.runuser, "-u", "postgres", "--"}, argv...)
	}
	return append(argv, args...)
}

// run runs a PostgreSQL program and returns an error with its output if it
// fails.
func (l *localServer) run(ctx context.Context, name string, args ...string) error {
	argv := l.argv(name, args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Dir = l.dir // readable by the postgres user, unlike the caller's directory
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, args[0], err, bytes.TrimSpace(out))
	}
	return nil
}

// waitSeconds is the -t value for pg_ctl: 60 s, or less if ctx ends sooner.
func waitSeconds(ctx context.Context) int {
	secs := 60
	if dl, ok := ctx.Deadline(); ok {
		secs = min(secs, max(1, int(time.Until(dl).Seconds())))
	}
	return secs
}

// findBinDir returns the directory that holds initdb, pg_ctl and postgres:
// the one pg_ctl on PATH resolves to, else the highest version under
// /usr/lib/postgresql/*/bin.
func findBinDir() (string, error) {
	if p, err := exec.LookPath("pg_ctl"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil && hasBinaries(filepath.Dir(real)) {
			return filepath.Dir(real), nil
		}
		if hasBinaries(filepath.Dir(p)) {
			return filepath.Dir(p), nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	best, bestVersion := "", []int(nil)
	for _, dir := range dirs {
		v := parseVersion(filepath.Base(filepath.Dir(dir)))
		if v != nil && hasBinaries(dir) && (best == "" || compareVersions(v, bestVersion) > 0) {
			best, bestVersion = dir, v
		}
	}
	if best == "" {
		return "", errors.New("initdb, pg_ctl and postgres not found on PATH or under /usr/lib/postgresql/*/bin")
	}
	return best, nil
}

func hasBinaries(dir string) bool {
	for _, name := range []string{"initdb", "pg_ctl", "postgres"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// parseVersion parses "15" or "9.6"; it returns nil for anything else.
func parseVersion(s string) []int {
	var v []int
	for _, part := range strings.Split(s, ".") {
		n, err := strconv.Atoi(part)
		if err != nil || n < 0 {
			return nil
		}
		v = append(v, n)
	}
	return v
}

func compareVersions(a, b []int) int {
	for i := 0; i < len(a) && i < len(b); i++ {
		if a[i] != b[i] {
			return a[i] - b[i]
		}
	}
	return len(a) - len(b)
}

func lookupIDs(name string) (uid, gid int, err error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, 0, err
	}
	if uid, err = strconv.Atoi(u.Uid); err != nil {
		return 0, 0, err
	}
	if gid, err = strconv.Atoi(u.Gid); err != nil {
		return 0, 0, err
	}
	return uid, gid, nil
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	return port, ln.Close()
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// tailFile returns the last n lines of a file, or a note why it cannot.
func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// shellQuote quotes s for /bin/sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func shellJoin(args []string) string {
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = shellQuote(a)
	}
	return strings.Join(quoted, " ")
}
