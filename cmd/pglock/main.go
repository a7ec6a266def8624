// Command pglock is flock(1) for a fleet of machines: it runs a command
// while holding a PostgreSQL advisory lock, shows who holds and awaits
// advisory locks, prints the key a name locks, and demonstrates the
// library. It is a thin layer over package advisory.
//
// Run "pglock --help" for the commands, their options and exit statuses.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
)

// Exit statuses. A run that started CMD exits with CMD's status instead
// (128+N when CMD was killed by signal N).
const (
	exitOK       = 0
	exitFailure  = 1  // pglock itself failed: cannot connect, server error
	exitUsage    = 2  // bad command line
	exitConflict = 75 // run: the lock was not acquired (EX_TEMPFAIL)
	exitLost     = 76 // run: the lock was lost or its TTL passed while CMD ran
	exitNoExec   = 126
	exitNotFound = 127
	exitSignal   = 128 // + signal number
)

const usage = `pglock: flock(1) for a fleet, backed by PostgreSQL advisory locks.

Usage:
  pglock run (--key NAME [--empty-key] | --id N | --pair A,B) [--shared | --slots N]
             [--no-wait] [--timeout DUR] [--ttl DUR] [--grace DUR] [--foreground]
             [--conflict-exit-code N] [--app-name NAME] [--dsn DSN]
             -- CMD [ARG...]
  pglock status [--key NAME [--empty-key] | --id N | --pair A,B] [--slots N] [--keys] [--json]
                [--watch [DUR]] [--dsn DSN]
  pglock key [--slots N] [--empty-key] NAME...
  pglock key --tool TOOL [ARG...]
  pglock demo [--dsn DSN]
  pglock help [COMMAND]
  pglock --version

Commands:
  run     run CMD while holding the lock; exit with CMD's status
  status  show who holds and who waits for advisory locks
  key     print the int64 key a name locks and its pg_locks columns
  demo    show contention, leader election and fail-over on a throw-away
          PostgreSQL (or on the configured database, leaving nothing behind)

Connection: --dsn, else DATABASE_URL, else the libpq environment variables
(PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSERVICE, ...).

Keys: --key NAME locks the XXH64 hash (seed 0) of NAME's UTF-8 bytes as a
bigint (as "xxhsum -H1" prints it); --id N the bigint N; --pair A,B the
two-int4 key (A, B), a key space apart from the bigint one.

Exit status of run:
  CMD's status  CMD ran while the lock was held (128+N if signal N killed it)
  75            the lock was not acquired: busy with --no-wait, or --timeout
                passed (--conflict-exit-code N changes it)
  76            the lock was lost, or its --ttl passed, while CMD ran: CMD's
                process group got SIGTERM (SIGKILL after --grace), and once
                it was empty a reason went to stderr
  126, 127      CMD could not be run (not executable, not found)
  128+N         pglock got signal N while waiting for the lock
  1             pglock failed (cannot connect, server error, the connection
                stalled while waiting); CMD did not run
  2             usage error

Run "pglock COMMAND --help" for a command's options.
`

func main() {
	os.Exit(pglock(os.Args[1:], os.Stdout, os.Stderr))
}

// pglock runs the command line args and returns the exit status.
func pglock(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, "pglock: missing command\n\n"+usage)
		return exitUsage
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:], stdout, stderr)
	case "status":
		return cmdStatus(args[1:], stdout, stderr)
	case "key":
		return cmdKey(args[1:], stdout, stderr)
	case "demo":
		return cmdDemo(args[1:], stdout, stderr)
	case watchdogArg:
		return watchdog(os.Stdin)
	case "help":
		if len(args) > 1 && args[1] != "help" {
			return pglock([]string{args[1], "--help"}, stdout, stderr)
		}
		fmt.Fprint(stdout, usage)
		return exitOK
	case "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	case "-version", "--version", "version":
		fmt.Fprintln(stdout, "pglock", version())
		return exitOK
	}
	fmt.Fprintf(stderr, "pglock: unknown command %q\n\n%s", args[0], usage)
	return exitUsage
}

// command is one subcommand's flag set and help text.
type command struct {
	fs       *flag.FlagSet
	synopsis string // the usage line(s)
	about    string // what the command does, after the usage line
}

func newCommand(name, synopsis, about string) *command {
	fs := flag.NewFlagSet("pglock "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors and help are printed by parse
	return &command{fs: fs, synopsis: synopsis, about: about}
}

// parse parses args. It returns -1 when the command should go on, or the
// exit status: 0 after printing the help for --help, 2 after printing a
// usage error.
func (c *command) parse(args []string, stdout, stderr io.Writer) int {
	err := c.fs.Parse(args)
	switch {
	case err == nil:
		return -1
	case errors.Is(err, flag.ErrHelp):
		c.help(stdout)
		return exitOK
	}
	return c.usageError(stderr, dashDash(err.Error()))
}

// help prints the command's full help.
func (c *command) help(w io.Writer) {
	fmt.Fprintf(w, "Usage:\n  %s\n\n%s", c.synopsis, c.about)
	first := true
	c.fs.VisitAll(func(f *flag.Flag) {
		if first {
			fmt.Fprintln(w, "\nOptions:")
			first = false
		}
		arg, text := flag.UnquoteUsage(f)
		if arg != "" {
			arg = " " + arg
		}
		fmt.Fprintf(w, "  --%s%s\n        %s\n", f.Name, arg, text)
	})
}

// usageError prints msg and the usage line to stderr and returns 2.
func (c *command) usageError(stderr io.Writer, msg string) int {
	fmt.Fprintf(stderr, "%s: %s\nUsage:\n  %s\nRun \"%s --help\" for details.\n",
		c.fs.Name(), msg, c.synopsis, c.fs.Name())
	return exitUsage
}

// oneLine turns a message into a single line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// version is the module version pglock was built from ("(devel)" for a
// build in a working tree), with the VCS revision when Go recorded one.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "(unknown version)"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			v += " " + s.Value
		}
	}
	return v
}
