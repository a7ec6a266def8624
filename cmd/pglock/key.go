package main

import (
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"unicode"

	"github.com/seed0ad592b7/advisory"
)

func cmdKey(args []string, stdout, stderr io.Writer) int {
	c := newCommand("key", "pglock key NAME...",
		`Prints, for each NAME, the key "pglock run --key NAME" locks: XXH64 (seed 0)
of NAME's UTF-8 bytes, in hex (as "xxhsum -H1" prints it) and as the bigint
pg_advisory_lock takes, and the classid, objid and objsubid of its pg_locks
row. It needs no database. A NAME with spaces or control characters is
printed quoted.
`)
	if code := c.parse(args, stdout, stderr); code >= 0 {
		return code
	}
	if c.fs.NArg() == 0 {
		return c.usageError(stderr, "missing NAME")
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "XXH64\tINT64\tCLASSID\tOBJID\tOBJSUBID\tNAME")
	for _, name := range c.fs.Args() {
		k := advisory.StringKey(name)
		v, _ := k.Int64()
		classid, objid, objsubid := k.LockRow()
		fmt.Fprintf(tw, "%016x\t%d\t%d\t%d\t%d\t%s\n", uint64(v), v, classid, objid, objsubid, printable(name))
	}
	if err := tw.Flush(); err != nil {
		fmt.Fprintln(stderr, "pglock:", err)
		return exitFailure
	}
	return exitOK
}

// printable returns name as is, or Go-quoted when it is empty or has
// spaces or characters that are not printable.
func printable(name string) string {
	for _, r := range name {
		if unicode.IsSpace(r) || !unicode.IsPrint(r) || r == '"' {
			return strconv.Quote(name)
		}
	}
	if name == "" {
		return `""`
	}
	return name
}
