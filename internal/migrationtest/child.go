package migrationtest

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// Instances run as child processes of the test binary, and what they
// report to the parent test.

// Child is an instance run as a child process of the test binary.
type Child struct {
	Cmd  *exec.Cmd
	out  strings.Builder
	mu   sync.Mutex
	done chan error
}

// Start runs test (a top-level test name; it plays role when EnvRole says
// so) in a child process of the test binary, migrating dsn, with more
// environment in env.
func Start(t *testing.T, test, role, dsn string, env ...string) *Child {
	t.Helper()
	c := &Child{done: make(chan error, 1)}
	c.Cmd = exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v", "-test.timeout="+Timeout.String())
	c.Cmd.Env = append(append(os.Environ(), EnvRole+"="+role, EnvDSN+"="+dsn), env...)
	c.Cmd.Stdout = writerFunc(c.write)
	c.Cmd.Stderr = writerFunc(c.write)
	if err := c.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.done <- c.Cmd.Wait() }()
	t.Cleanup(func() {
		_ = c.Cmd.Process.Kill()
		<-c.done
		c.done <- nil
	})
	return c
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

func (c *Child) write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(b)
}

// Output is what the child wrote so far.
func (c *Child) Output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.String()
}

// Wait waits for the child to exit, at most Timeout, and returns its exit
// error; the test fails if it does not exit.
func (c *Child) Wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-c.done:
		c.done <- err
		return err
	case <-time.After(Timeout):
		t.Fatalf("child %v did not exit within %v; its output:\n%s", c.Cmd.Args, Timeout, c.Output())
		return nil
	}
}

// Result returns the value of the child's "RESULT key=value" line for key,
// or "" if it wrote none.
func (c *Child) Result(key string) string {
	for _, line := range strings.Split(c.Output(), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "RESULT "+key+"="); ok {
			return v
		}
	}
	return ""
}

// Report writes a "RESULT key=value" line for the parent test (Result).
func Report(w io.Writer, key string, value any) { fmt.Fprintf(w, "RESULT %s=%v\n", key, value) }
