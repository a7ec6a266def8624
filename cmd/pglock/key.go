package main

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
)

func cmdKey(args []string, stdout, stderr io.Writer) int {
	c := newCommand("key", "pglock key [--slots N] [--empty-key] NAME...\n  pglock key --tool goose|migrate|rails|sqlx-migrate [ARG...]",
		`Prints, for each NAME, the key "pglock run --key NAME" locks: XXH64 (seed 0)
of NAME's UTF-8 bytes, in hex (as "xxhsum -H1" prints it) and as the bigint
pg_advisory_lock takes, and the classid, objid and objsubid of its pg_locks
row. It needs no database. A NAME with spaces or control characters is
printed quoted. An empty NAME is refused without --empty-key, as by
"pglock run" and "pglock status".

With --slots N, prints instead, for each NAME, the N slot keys of the
semaphore "pglock run --key NAME --slots N" takes one of (slot i, from 0, is
the name "int64:K#i" for NAME's key K).

With --tool, prints instead the key another tool locks while it migrates
(package compat), for "pglock run --id N" to wait for it:
  goose                              goose v3's default lock id
  migrate DATABASE [SCHEMA [TABLE]]  golang-migrate v4 (postgres, pgx/v5);
      SCHEMA defaults to public, TABLE to schema_migrations. It hashes
      DATABASE as its driver has it: current_database() when opened with
      WithInstance, the URL's path with its slash ("/DATABASE") when opened
      from a URL (migrate.New, the migrate CLI); both are printed.
  rails DATABASE                     ActiveRecord's migrator
  sqlx-migrate DATABASE              Rust sqlx's migrator
DATABASE is the name SELECT current_database() returns.
`)
	tool := c.fs.String("tool", "", "print the key `TOOL` locks: goose, migrate, rails or sqlx-migrate")
	var slots slotsFlag
	c.fs.Var(&slots, "slots", "print the `N` slot keys of the semaphore on each NAME")
	emptyKey := c.fs.Bool("empty-key", false, "allow an empty NAME (refused otherwise, as it is usually an unset variable)")
	if code := c.parse(args, stdout, stderr); code >= 0 {
		return code
	}
	if *tool != "" && slots > 0 {
		return c.usageError(stderr, "give --tool or --slots, not both")
	}
	if *tool != "" {
		keys, msg := toolKeys(*tool, c.fs.Args())
		if msg != "" {
			return c.usageError(stderr, msg)
		}
		return printToolKeys(keys, stdout, stderr)
	}
	if c.fs.NArg() == 0 {
		return c.usageError(stderr, "missing NAME")
	}
	if slices.Contains(c.fs.Args(), "") && !*emptyKey {
		return c.usageError(stderr, emptyName)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "XXH64\tINT64\tCLASSID\tOBJID\tOBJSUBID\tNAME")
	for _, name := range c.fs.Args() {
		keys, labels := []advisory.Key{advisory.StringKey(name)}, []string{printable(name)}
		if slots > 0 {
			keys, labels = slotKeys(name, slots)
		}
		for i, k := range keys {
			v, _ := k.Int64()
			classid, objid, objsubid := k.LockRow()
			fmt.Fprintf(tw, "%016x\t%d\t%d\t%d\t%d\t%s\n", uint64(v), v, classid, objid, objsubid, labels[i])
		}
	}
	if err := tw.Flush(); err != nil {
		fmt.Fprintln(stderr, "pglock:", err)
		return exitFailure
	}
	return exitOK
}

// toolKey is a key another tool locks.
type toolKey struct {
	tool string // the --tool name
	of   string // what the lock is, for people
	key  advisory.Key
}

// toolKeys returns the keys "pglock key --tool tool args..." prints, or a
// usage message.
func toolKeys(tool string, args []string) ([]toolKey, string) {
	need := func(min, max int, what string) string {
		if len(args) < min || len(args) > max {
			return fmt.Sprintf("--tool %s takes %s (got %d arguments)", tool, what, len(args))
		}
		return ""
	}
	switch tool {
	case "goose":
		if msg := need(0, 0, "no arguments"); msg != "" {
			return nil, msg
		}
		return []toolKey{{tool, "goose migrations (default lock id)", compat.Goose()}}, ""
	case "migrate":
		if msg := need(1, 3, "DATABASE [SCHEMA [TABLE]]"); msg != "" {
			return nil, msg
		}
		database, schema, table := args[0], "public", "schema_migrations"
		if len(args) > 1 {
			schema = args[1]
		}
		if len(args) > 2 {
			table = args[2]
		}
		keys := []toolKey{golangMigrateKey(database, schema, table)}
		if !strings.HasPrefix(database, "/") {
			keys = append(keys, golangMigrateKey("/"+database, schema, table))
		}
		return keys, ""
	case "rails":
		if msg := need(1, 1, "DATABASE"); msg != "" {
			return nil, msg
		}
		return []toolKey{{tool, fmt.Sprintf("Rails migrations of %s", printable(args[0])), compat.Rails(args[0])}}, ""
	case "sqlx-migrate":
		if msg := need(1, 1, "DATABASE"); msg != "" {
			return nil, msg
		}
		return []toolKey{{tool, fmt.Sprintf("sqlx migrations of %s", printable(args[0])), compat.SQLxMigrate(args[0])}}, ""
	}
	return nil, fmt.Sprintf("unknown --tool %q: want goose, migrate, rails or sqlx-migrate", tool)
}

// golangMigrateKey is golang-migrate's lock for the driver's DatabaseName
// database: "/NAME" when it was opened from a URL.
func golangMigrateKey(database, schema, table string) toolKey {
	how := "WithInstance"
	if strings.HasPrefix(database, "/") {
		how = "URL, migrate CLI"
	}
	return toolKey{"migrate", fmt.Sprintf("golang-migrate (%s) of %s, %s.%s", how, printable(database), printable(schema), printable(table)),
		compat.GolangMigrate(database, schema, table)}
}

// knownToolKeys are the migration locks "pglock status" labels in database,
// with the --tool name of their tool: goose's default, golang-migrate's with
// public.schema_migrations (opened either way), Rails' and sqlx's.
func knownToolKeys(database string) map[advisory.Key]string {
	return map[advisory.Key]string{
		compat.Goose(): "goose",
		compat.GolangMigrate(database, "public", "schema_migrations"):     "migrate",
		compat.GolangMigrate("/"+database, "public", "schema_migrations"): "migrate",
		compat.Rails(database):       "rails",
		compat.SQLxMigrate(database): "sqlx-migrate",
	}
}

func printToolKeys(keys []toolKey, stdout, stderr io.Writer) int {
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "INT64\tCLASSID\tOBJID\tOBJSUBID\tLOCK")
	for _, k := range keys {
		v, _ := k.key.Int64()
		classid, objid, objsubid := k.key.LockRow()
		fmt.Fprintf(tw, "%d\t%d\t%d\t%d\t%s\n", v, classid, objid, objsubid, k.of)
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
