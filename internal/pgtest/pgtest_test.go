package pgtest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// shared is the server started by TestMain through RunMain.
var shared *Server

func TestMain(m *testing.M) {
	if mode := os.Getenv("PGTEST_HELPER"); mode != "" {
		helperDie(mode)
	}
	code := RunMain(m, Options{Private: true, Settings: map[string]string{"max_connections": "20"}},
		func(s *Server) { shared = s })
	if code == 0 && shared != nil {
		if shared.local != nil && fileExists(shared.local.dir) {
			fmt.Fprintln(os.Stderr, "RunMain left", shared.local.dir)
			code = 1
		}
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goroutines leaked after RunMain:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// helperDie runs in a child process: it starts a server, prints its
// directory and port, and then dies without calling Stop: by a panic, or
// by the SIGINT its parent sends.
func helperDie(mode string) {
	s, err := Start(context.Background(), Options{Private: true})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	fmt.Println("server", s.local.dir, s.Port)
	if mode == "sigint" {
		time.Sleep(time.Minute) // the helper's life until its parent's SIGINT, not synchronisation
		os.Exit(0)
	}
	panic("simulated test panic")
}

func startPrivate(t *testing.T, settings map[string]string) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	begin := time.Now()
	s, err := Start(ctx, Options{Private: true, Settings: settings})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Start: %s server on port %d in %v", s.Source(), s.Port, time.Since(begin))
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

func show(t *testing.T, conn *pgx.Conn, name string) string {
	t.Helper()
	var v string
	if err := conn.QueryRow(context.Background(), "SHOW "+name).Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// wantSource is the source Start should pick for a private server here:
// docker if an engine answers a ping, else local.
func wantSource(t *testing.T) string {
	t.Helper()
	begin := time.Now()
	err := dockerPing(context.Background())
	t.Logf("docker check: %v after %v", err, time.Since(begin))
	if err != nil {
		return SourceLocal
	}
	return SourceDocker
}

func portRefuses(port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 2*time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return true
}

// processesMentioning returns the command lines in /proc that contain s.
func processesMentioning(t *testing.T, s string) []string {
	t.Helper()
	paths, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the process ended
		}
		if cmdline := strings.ReplaceAll(string(b), "\x00", " "); strings.Contains(cmdline, s) {
			found = append(found, cmdline)
		}
	}
	return found
}

func TestRunMainServer(t *testing.T) {
	defer goleak.VerifyNone(t)
	if shared == nil || shared.Source() != SourceLocal && shared.Source() != SourceDocker || !shared.Controllable() {
		t.Fatalf("shared server %+v", shared)
	}
	if got := show(t, connect(t, shared.DSN), "max_connections"); got != "20" {
		t.Errorf("max_connections = %q, want 20", got)
	}
}

func TestSettings(t *testing.T) {
	defer goleak.VerifyNone(t)
	want := wantSource(t)
	s := startPrivate(t, map[string]string{"max_locks_per_transaction": "17", "application_name": "it's pgtest"})
	if s.Source() != want {
		t.Errorf("Source() = %q, want %q", s.Source(), want)
	}
	if !s.Controllable() {
		t.Error("Controllable() = false")
	}
	wantDSN := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", s.Port)
	if s.DSN != wantDSN || s.Host != "127.0.0.1" {
		t.Errorf("DSN %q host %q, want %q", s.DSN, s.Host, wantDSN)
	}
	conn := connect(t, s.DSN)
	if got := show(t, conn, "max_locks_per_transaction"); got != "17" {
		t.Errorf("max_locks_per_transaction = %q, want 17", got)
	}
	if got := show(t, conn, "application_name"); got != "it's pgtest" {
		t.Errorf("application_name = %q", got)
	}
	if got := show(t, conn, "fsync"); got != "off" {
		t.Errorf("fsync = %q, want off", got)
	}
}

func TestNoDSNPicksDockerOrLocalFast(t *testing.T) {
	defer goleak.VerifyNone(t)
	t.Setenv(EnvDSN, "")
	want := wantSource(t)
	begin := time.Now()
	s, err := Start(context.Background(), Options{})
	elapsed := time.Since(begin)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	t.Logf("Start(Options{}) took %v, source %s", elapsed, s.Source())
	if s.Source() != want {
		t.Errorf("Source() = %q, want %q", s.Source(), want)
	}
	// How long Start took is logged above, not asserted: the CPU is shared
	// (the docker ping's own 2 s bound keeps a missing engine from
	// delaying it; the test's timeout catches a hang).
}

func TestRestart(t *testing.T) {
	defer goleak.VerifyNone(t)
	s := startPrivate(t, map[string]string{"max_locks_per_transaction": "19"})
	port, dsn := s.Port, s.DSN
	before := connect(t, s.DSN)
	if _, err := before.Exec(context.Background(), "CREATE TABLE kept (x int)"); err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	if err := s.Restart(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Logf("Restart took %v", time.Since(begin))
	if s.Port != port || s.DSN != dsn {
		t.Errorf("after Restart port %d DSN %q, want %d %q", s.Port, s.DSN, port, dsn)
	}
	if _, err := before.Exec(context.Background(), "SELECT 1"); err == nil {
		t.Error("connection from before Restart still works")
	}
	after := connect(t, s.DSN)
	if _, err := after.Exec(context.Background(), "SELECT * FROM kept"); err != nil {
		t.Errorf("data lost across Restart: %v", err)
	}
	if got := show(t, after, "max_locks_per_transaction"); got != "19" {
		t.Errorf("max_locks_per_transaction after Restart = %q, want 19", got)
	}
}

func TestStop(t *testing.T) {
	defer goleak.VerifyNone(t)
	s := startPrivate(t, nil)
	if s.local == nil {
		t.Fatalf("test needs a local server, got %s", s.Source())
	}
	dir := s.local.dir
	if len(processesMentioning(t, dir)) == 0 {
		t.Fatalf("no process mentions %s while the server runs", dir)
	}
	begin := time.Now()
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Stop took %v", time.Since(begin))
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists after Stop: %v", dir, err)
	}
	if !portRefuses(s.Port) {
		t.Errorf("port %d still accepts connections after Stop", s.Port)
	}
	if ps := processesMentioning(t, dir); len(ps) > 0 {
		t.Errorf("processes remain after Stop: %q", ps)
	}
	if err := s.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if err := s.Restart(context.Background()); err == nil {
		t.Error("Restart after Stop succeeded")
	}
}

func TestDSNSource(t *testing.T) {
	defer goleak.VerifyNone(t)
	t.Setenv(EnvDSN, shared.DSN)
	s, err := Start(context.Background(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Source() != SourceDSN || s.Controllable() || s.DSN != shared.DSN || s.Port != shared.Port || s.Host != "127.0.0.1" {
		t.Errorf("got source %q controllable %v DSN %q host %q port %d", s.Source(), s.Controllable(), s.DSN, s.Host, s.Port)
	}
	if err := s.Restart(context.Background()); err == nil {
		t.Error("Restart of a dsn server succeeded")
	}
	if err := s.Stop(); err != nil {
		t.Error(err)
	}
	if err := s.Stop(); err != nil {
		t.Error(err)
	}
	// Stop must not have touched the external server.
	connect(t, shared.DSN)

	// Private and Settings both bypass the DSN.
	for _, opts := range []Options{{Private: true}, {Settings: map[string]string{"work_mem": "8MB"}}} {
		s, err := Start(context.Background(), opts)
		if err != nil {
			t.Fatal(err)
		}
		if s.Source() == SourceDSN || s.Port == shared.Port {
			t.Errorf("%+v: got source %q port %d", opts, s.Source(), s.Port)
		}
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
	}
}

func TestDSNUnreachable(t *testing.T) {
	defer goleak.VerifyNone(t)
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvDSN, loopbackDSN(port))
	if _, err := Start(context.Background(), Options{}); err == nil || !strings.Contains(err.Error(), EnvDSN) {
		t.Errorf("Start with an unreachable DSN: %v", err)
	}
}

func TestBadSettings(t *testing.T) {
	defer goleak.VerifyNone(t)
	ctx := context.Background()
	for _, key := range []string{"bad key", "port", "x;y", ""} {
		if _, err := Start(ctx, Options{Settings: map[string]string{key: "1"}}); err == nil {
			t.Errorf("Start accepted setting %q", key)
		}
	}
	// A temporary directory of its own, so that servers other test
	// processes start meanwhile (go test runs packages in parallel) do not
	// count as left behind. The postgres user must be able to enter it.
	tmp, err := os.MkdirTemp("", "pgtest-badsettings-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TMPDIR", tmp)
	before, _ := filepath.Glob(filepath.Join(os.TempDir(), "pgtest-*"))
	_, err = Start(ctx, Options{Private: true, Settings: map[string]string{"no_such_setting_pgtest": "1"}})
	if err == nil {
		t.Fatal("Start accepted an unknown setting")
	}
	t.Logf("error: %v", err)
	for _, want := range []string{"no_such_setting_pgtest", "apt-get install -y postgresql", EnvDSN} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q", want)
		}
	}
	after, _ := filepath.Glob(filepath.Join(os.TempDir(), "pgtest-*"))
	if len(after) > len(before) {
		t.Errorf("failed Start left directories: before %q after %q", before, after)
	}
}

// awaitRemoved waits until dir is removed, watching it with inotify, and
// reports whether that happened within d.
func awaitRemoved(t *testing.T, dir string, d time.Duration) bool {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	events := os.NewFile(uintptr(fd), "inotify") // non-blocking: its reads take a deadline
	defer events.Close()
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_DELETE_SELF); errors.Is(err, unix.ENOENT) {
		return true // already gone
	} else if err != nil {
		t.Fatal(err)
	}
	if err := events.SetReadDeadline(time.Now().Add(d)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for {
		// The only events: dir deleted (IN_DELETE_SELF), its watch
		// removed (IN_IGNORED).
		if _, err := events.Read(buf); err != nil {
			return !fileExists(dir)
		}
		if !fileExists(dir) {
			return true
		}
	}
}

// TestWatchdog checks that a server is removed when the process that
// started it dies without calling Stop.
func TestWatchdog(t *testing.T) {
	defer goleak.VerifyNone(t)
	for _, mode := range []string{"panic", "sigint"} {
		t.Run(mode, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "PGTEST_HELPER="+mode)
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			cmd.WaitDelay = 10 * time.Second
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			var dir string
			var port int
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				t.Log("helper:", sc.Text())
				if n, _ := fmt.Sscanf(sc.Text(), "server %s %d", &dir, &port); n == 2 {
					break
				}
			}
			if mode == "sigint" && dir != "" {
				// Like Ctrl-C: the whole process group gets SIGINT.
				if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGINT); err != nil {
					t.Error(err)
				}
			}
			_, _ = io.Copy(io.Discard, stdout)
			if err := cmd.Wait(); err == nil {
				t.Error("helper exited with status 0")
			}
			if dir == "" {
				t.Fatal("helper printed no server")
			}
			if !awaitRemoved(t, dir, 30*time.Second) { // only "it did not hang"
				t.Fatalf("%s still exists 30 s after the helper died", dir)
			}
			if !portRefuses(port) {
				t.Errorf("port %d still accepts connections", port)
			}
			// The watchdog's shell removes the directory as its last
			// command, then exits: it may still be exiting now. It is not
			// our child (nothing to wait on), so look again until it is
			// gone, within a bound of its own.
			var ps []string
			defer func() {
				if t.Failed() {
					t.Logf("processes that remained: %q", ps)
				}
			}()
			Await(t, "no process mentioning the removed directory", 10*time.Second, func() (bool, error) {
				ps = processesMentioning(t, dir)
				return len(ps) == 0, nil
			})
		})
	}
}

// TestDockerHelperEngineFails runs the Docker helper (go run, resolved by
// go.work) against an engine that answers its ping and fails everything
// else (a stand-in: no engine is needed to test the helper's protocol):
// the Docker step must fail with the helper's own message, within its
// bound, and leave no helper process behind. The first run builds the
// helper.
func TestDockerHelperEngineFails(t *testing.T) {
	defer goleak.VerifyNone(t)
	sock := filepath.Join(t.TempDir(), "docker.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var asked []string
	engine := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		asked = append(asked, r.Method+" "+r.URL.Path)
		mu.Unlock()
		if strings.HasSuffix(r.URL.Path, "/_ping") {
			w.Write([]byte("OK"))
			return
		}
		http.Error(w, "not an engine", http.StatusInternalServerError)
	})}
	go engine.Serve(ln)
	defer engine.Close()
	t.Setenv("DOCKER_HOST", "unix://"+sock)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	s, err := startDocker(ctx, map[string]string{"max_connections": "20"})
	if err == nil {
		t.Fatalf("startDocker with an engine that fails returned a server (%s)", s.Source())
	}
	if want := "run postgres:15 container"; !strings.Contains(err.Error(), want) {
		t.Fatalf("startDocker error = %v, want the helper's %q", err, want)
	}
	mu.Lock()
	t.Logf("the helper asked the engine: %q", asked)
	if len(asked) < 2 {
		t.Errorf("the engine was asked %q: want the ping and the helper's requests", asked)
	}
	mu.Unlock()
	if left := processesMentioning(t, dockerHelper); len(left) > 0 {
		t.Errorf("helper processes left: %q", left)
	}
}

// TestDockerNoEngineSkipsHelper: with no engine answering, the Docker step
// fails with pgtest's own ping error (the helper's names the address as
// unix:///…), so the helper was neither built nor run.
func TestDockerNoEngineSkipsHelper(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "docker.sock")
	t.Setenv("DOCKER_HOST", "unix://"+sock)
	_, err := startDocker(context.Background(), nil)
	if err == nil || !strings.Contains(err.Error(), "no Docker engine answered at unix:"+sock+" ") {
		t.Fatalf("startDocker with no engine at %s: %v, want pgtest's ping error", sock, err)
	}
}
