package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// envProcChild turns the test binary into one client process of
// BenchmarkContendedProcesses: "SUBJECT|DSN|KEY".
const envProcChild = "BENCH_PROC_CHILD"

// procBlock is how long the clients of one subject run in one op of
// BenchmarkContendedProcesses.
const procBlock = time.Second

// BenchmarkContendedProcesses is BenchmarkContendedInterleaved with each
// client a process of its own (the test binary, started again): 16
// processes on 4 keys, one goroutine each, so no cohort can form (SPEC
// §13) and every hand-off goes through the server. Per op, each subject's
// 16 processes connect, then run lock+unlock cycles for procBlock, in a new
// random order of subjects each op. NAME-p50-ns is the time per cycle (all
// processes together), so NAME-vs-floor is the subject's throughput
// against raw pgx's; compare with bench/pgbench, the server-side floor.
// NAME-client-cpu-ns is the CPU time (user and system, from getrusage)
// the subject's client processes spent per cycle while they ran cycles,
// and NAME-client-waits their voluntary context switches per cycle (a
// thread that went to sleep: each costs a wake-up later): on a machine
// whose cores the server and the 16 clients share, they tell a client-side
// cost from the scheduling noise that moves the p50. NAME-fair is how
// evenly the processes were served: the fewest cycles a process ran in an
// op against the mean per process, summed over all ops (interleave's
// untimed first op included): 1 is even, near 0 means a process starved
// in most ops (a starved process still counts the cycle whose lock call
// waited until the others stopped, so its count is 1, not 0); a subject
// that lets a releasing process take the key again before the waiters has
// a high p50 ratio and a low NAME-fair.
//
//	go test -run '^$' -bench '^BenchmarkContendedProcesses$' -benchtime 5x -count 2 .
func BenchmarkContendedProcesses(b *testing.B) {
	names := []string{"raw-pgx", "advisory-acquire", "advisory-session"}
	used := make([]procUse, len(names)) // summed over the ops
	interleave(b, names, func(i int) time.Duration {
		u := runProcs(b, names[i], contendedKey+2000+int64(i*contendedKeys))
		used[i].add(u)
		return procBlock / time.Duration(max(u.cycles, 1))
	})
	for i, name := range names {
		n := float64(max(used[i].cycles, 1))
		b.ReportMetric(float64(used[i].cpu.Nanoseconds())/n, name+"-client-cpu-ns")
		b.ReportMetric(float64(used[i].waits)/n, name+"-client-waits")
		b.ReportMetric(float64(used[i].fewest*contenders)/n, name+"-fair")
	}
}

// procUse is what client processes did while they ran cycles: how many,
// with what CPU time, and how many voluntary context switches; fewest is
// the fewest cycles one of them ran (in one op: runProcs; add sums it over
// ops, as the others).
type procUse struct {
	cycles int64
	cpu    time.Duration
	waits  int64
	fewest int64
}

func (u *procUse) add(v procUse) {
	u.cycles += v.cycles
	u.cpu += v.cpu
	u.waits += v.waits
	u.fewest += v.fewest
}

// runProcs runs contenders client processes of subject for procBlock and
// returns what they did in all.
func runProcs(b *testing.B, subject string, firstKey int64) procUse {
	b.Helper()
	type proc struct {
		cmd   *exec.Cmd
		in    io.WriteCloser
		out   *bufio.Scanner
		stdio strings.Builder
	}
	procs := make([]*proc, contenders)
	for g := range procs {
		p := &proc{cmd: exec.Command(os.Args[0], "-test.run=^$")}
		p.cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s|%s|%d", envProcChild, subject, dsn, firstKey+int64(g%contendedKeys)))
		p.cmd.Stderr = &p.stdio
		p.cmd.WaitDelay = 5 * time.Second
		in, err := p.cmd.StdinPipe()
		if err != nil {
			b.Fatal(err)
		}
		out, err := p.cmd.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := p.cmd.Start(); err != nil {
			b.Fatal(err)
		}
		p.in, p.out = in, bufio.NewScanner(out)
		procs[g] = p
	}
	line := func(p *proc) string {
		if !p.out.Scan() {
			_ = p.cmd.Wait()
			b.Fatalf("a %s client process ended: %s", subject, p.stdio.String())
		}
		return p.out.Text()
	}
	for _, p := range procs {
		if s := line(p); s != "ready" {
			b.Fatalf("a %s client process said %q", subject, s)
		}
	}
	for _, p := range procs {
		_, _ = io.WriteString(p.in, "go\n")
	}
	var all procUse
	fewest := int64(-1)
	for _, p := range procs {
		var u procUse
		if _, err := fmt.Sscan(line(p), &u.cycles, &u.cpu, &u.waits); err != nil {
			b.Fatal(err)
		}
		all.add(u)
		if fewest < 0 || u.cycles < fewest {
			fewest = u.cycles
		}
		if err := p.cmd.Wait(); err != nil {
			b.Fatalf("a %s client process: %v: %s", subject, err, p.stdio.String())
		}
	}
	all.fewest = fewest
	return all
}

// processUse is the CPU time, user and system, the process has used, and
// its voluntary context switches.
func processUse() (time.Duration, int64) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), ru.Nvcsw
}

// envProcProfile, set to a directory, has each client process of
// BenchmarkContendedProcesses write a CPU profile of its cycles there
// (SUBJECT-PID.pprof), to be read together:
//
//	BENCH_PROC_PROFILE=/tmp/prof go test -run '^$' -bench '^BenchmarkContendedProcesses$' -benchtime 1x .
//	go tool pprof -top /tmp/prof/advisory-acquire-*.pprof
const envProcProfile = "BENCH_PROC_PROFILE"

// procChild is one client process: it connects, says "ready", waits for a
// line on stdin, runs lock+unlock cycles for procBlock and prints how many
// with the CPU time they took (nanoseconds) and the voluntary context
// switches they made.
func procChild(spec string) int {
	f := strings.Split(spec, "|")
	subject, dsn := f[0], f[1]
	var key int64
	fmt.Sscan(f[2], &key)
	ctx := context.Background()
	fail := func(err error) int { fmt.Fprintln(os.Stderr, err); return 1 }
	var lock, unlock func() error
	switch subject {
	case "raw-pgx":
		c, err := pgx.Connect(ctx, dsn)
		if err != nil {
			return fail(err)
		}
		defer c.Close(ctx)
		lock = func() error { _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", key); return err }
		unlock = func() error { _, err := c.Exec(ctx, "SELECT pg_advisory_unlock($1)", key); return err }
	case "advisory-acquire", "advisory-session":
		pool, err := pgxpool.New(ctx, dsn)
		if err != nil {
			return fail(err)
		}
		defer pool.Close()
		k := advisory.Int64Key(key)
		if subject == "advisory-session" {
			s, err := advisory.NewSession(ctx, pool)
			if err != nil {
				return fail(err)
			}
			defer s.Close(ctx)
			lock = func() error { _, err := s.Lock(ctx, k); return err }
			unlock = func() error { return s.Unlock(ctx, k) }
			break
		}
		var l *advisory.Lock
		lock = func() error { var err error; l, err = advisory.Acquire(ctx, pool, k); return err }
		unlock = func() error { return l.Release(ctx) }
	default:
		return fail(fmt.Errorf("unknown subject %q", subject))
	}
	// One cycle before the start, to connect and prepare the statements.
	if err := lock(); err != nil {
		return fail(err)
	}
	if err := unlock(); err != nil {
		return fail(err)
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return fail(err)
	}
	if dir := os.Getenv(envProcProfile); dir != "" {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%d.pprof", subject, os.Getpid())))
		if err != nil {
			return fail(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fail(err)
		}
		defer pprof.StopCPUProfile()
	}
	var n int64
	cpu, waits := processUse()
	for end := time.Now().Add(procBlock); time.Now().Before(end); n++ {
		if err := lock(); err != nil {
			return fail(err)
		}
		if err := unlock(); err != nil {
			return fail(err)
		}
	}
	cpuEnd, waitsEnd := processUse()
	fmt.Println(n, int64(cpuEnd-cpu), waitsEnd-waits)
	return 0
}
