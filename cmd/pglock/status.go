package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory"
)

// statusTimeout bounds "pglock status" as a whole.
const statusTimeout = 30 * time.Second

func cmdStatus(args []string, stdout, stderr io.Writer) int {
	c := newCommand("status",
		"pglock status [--key NAME | --id N | --pair A,B] [--json] [--dsn DSN]",
		`Shows every advisory lock of the database, held or awaited, or those of
one key: key, mode, held or waiting, pid, how long, client and
application_name. It reads pg_locks and pg_stat_activity; it never tries
to lock. A waiter's FOR is since its wait began; PostgreSQL records no
grant time, so a holder's FOR is since its session last changed state (a
session that keeps sending statements, as pglock run's health check does,
shows a short time) and CONNECTED bounds how long it can have held it.
--json prints a JSON array for scripts (times in RFC 3339, null unknown).
`)
	kf := addKeyFlags(c.fs, "show only")
	dsn := addDSNFlag(c.fs, "connection string `DSN` (default: DATABASE_URL, else the PG* environment)")
	asJSON := c.fs.Bool("json", false, "print JSON instead of a table")
	if code := c.parse(args, stdout, stderr); code >= 0 {
		return code
	}
	if msg := kf.check(false); msg != "" {
		return c.usageError(stderr, msg)
	}
	if c.fs.NArg() > 0 {
		return c.usageError(stderr, fmt.Sprintf("unexpected argument %q", c.fs.Arg(0)))
	}
	cn := connFrom(*dsn)
	fail := func(err error) int {
		fmt.Fprintln(stderr, "pglock: "+oneLine(cn.redact(err.Error())))
		return exitFailure
	}
	cfg, err := cn.connConfig("pglock status")
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
	defer cancel()
	db, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fail(cn.connectError(cfg, err))
	}
	defer db.Close(context.Background())

	var hs []advisory.Holder
	if len(kf.given) == 1 {
		hs, err = advisory.Holders(ctx, db, kf.key)
	} else {
		hs, err = advisory.AllHolders(ctx, db)
	}
	if err != nil {
		return fail(err)
	}
	name := ""
	if len(kf.given) == 1 && kf.given[0] == "--key" {
		name = kf.name
	}
	if *asJSON {
		err = writeJSON(stdout, hs, name)
	} else {
		err = writeTable(stdout, hs, name, kf.describe(), len(kf.given) == 1)
	}
	if err != nil {
		return fail(err)
	}
	return exitOK
}

// holderJSON is one element of "pglock status --json".
type holderJSON struct {
	Key             string     `json:"key"`            // "int64:N" or "pair:A,B"
	Name            string     `json:"name,omitempty"` // the --key NAME
	Int64           *int64     `json:"int64,omitempty"`
	Pair            []int32    `json:"pair,omitempty"`
	ClassID         uint32     `json:"classid"`
	ObjID           uint32     `json:"objid"`
	ObjSubID        int16      `json:"objsubid"`
	Mode            string     `json:"mode"` // "exclusive" or "shared"
	Granted         bool       `json:"granted"`
	PID             int32      `json:"pid"`
	ApplicationName string     `json:"application_name"`
	ClientAddr      string     `json:"client_addr"`
	State           string     `json:"state"`
	Since           *time.Time `json:"since"`
	BackendStart    *time.Time `json:"backend_start"`
}

func writeJSON(w io.Writer, hs []advisory.Holder, name string) error {
	out := make([]holderJSON, 0, len(hs))
	for _, h := range hs {
		classid, objid, objsubid := h.Key.LockRow()
		j := holderJSON{
			Key: h.Key.String(), Name: name, ClassID: classid, ObjID: objid, ObjSubID: objsubid,
			Mode: h.Mode.String(), Granted: h.Granted, PID: h.PID,
			ApplicationName: h.ApplicationName, ClientAddr: h.ClientAddr, State: h.State,
			Since: timeOrNil(h.Since), BackendStart: timeOrNil(h.BackendStart),
		}
		if v, ok := h.Key.Int64(); ok {
			j.Int64 = &v
		}
		if a, b, ok := h.Key.Pair(); ok {
			j.Pair = []int32{a, b}
		}
		out = append(out, j)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

func timeOrNil(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

func writeTable(w io.Writer, hs []advisory.Holder, name, what string, oneKey bool) error {
	if len(hs) == 0 {
		if oneKey {
			_, err := fmt.Fprintf(w, "no session holds or waits for %s\n", what)
			return err
		}
		_, err := fmt.Fprintln(w, "no advisory locks held or awaited in this database")
		return err
	}
	if name != "" {
		fmt.Fprintf(w, "key %s\n", what)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tMODE\tSTATUS\tPID\tFOR\tCONNECTED\tCLIENT\tAPPLICATION")
	now := time.Now()
	for _, h := range hs {
		status := "held"
		if !h.Granted {
			status = "waiting"
		}
		client := h.ClientAddr
		if client == "" {
			client = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", h.Key, h.Mode, status, h.PID,
			age(now, h.Since), age(now, h.BackendStart), client, h.ApplicationName)
	}
	return tw.Flush()
}

// age is now-t rounded for people, "-" for an unknown t.
func age(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := max(now.Sub(t), 0)
	if d < time.Minute {
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}
