package pgtest

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"
)

// fatalTB records Await's verdict: its Fatalf ends the goroutine, as the
// testing package's does.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Helper() {}

func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// await runs Await on a fatalTB in a goroutine of its own, and returns
// what it stopped with ("" if it returned).
func await(bound time.Duration, cond func() (bool, error)) string {
	f := &fatalTB{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Await(f, "the awaited state", bound, cond)
	}()
	<-done
	return f.msg
}

// Await returns once the state is seen, says what it awaited when its
// bound passes first, and stops at once on an error.
func TestAwait(t *testing.T) {
	calls := 0
	if msg := await(time.Minute, func() (bool, error) { calls++; return calls == 3, nil }); msg != "" || calls != 3 {
		t.Errorf("Await stopped with %q after %d calls; want it to return on the third", msg, calls)
	}
	start := time.Now()
	msg := await(50*time.Millisecond, func() (bool, error) { return false, nil })
	if !strings.Contains(msg, "not seen within 50ms: the awaited state") {
		t.Errorf("Await past its bound stopped with %q; want it to say what it awaited", msg)
	}
	if took := time.Since(start); took < 50*time.Millisecond || took > 10*time.Second {
		t.Errorf("Await past its 50 ms bound stopped after %v", took)
	}
	msg = await(time.Minute, func() (bool, error) { return false, errors.New("no server") })
	if !strings.Contains(msg, "the awaited state: no server") {
		t.Errorf("Await with a failing cond stopped with %q; want the error and what it awaited", msg)
	}
}
