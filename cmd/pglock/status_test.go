package main

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	"github.com/seed0ad592b7/advisory"
)

func TestStatus(t *testing.T) {
	e := newEnv(t)
	key := advisory.StringKey("status")
	v, _ := key.Int64()
	holder := e.hold(key, false)
	waiter := e.conn()
	waited := make(chan error, 1)
	go func() {
		_, err := waiter.Exec(e.ctx, "SELECT pg_advisory_lock($1::int8)", v)
		waited <- err
	}()
	e.awaitHolders(key, 1, 1)
	holderPID, waiterPID := int32(holder.PgConn().PID()), int32(waiter.PgConn().PID())

	// The table: one row per session, the holder first.
	for _, args := range [][]string{{"--key", "status"}, {"--id", strconv.FormatInt(v, 10)}, {}} {
		p := e.pglock(nil, append([]string{"status", e.dsnArg()}, args...)...)
		e.want(p, 0)
		var held, waiting bool
		for _, line := range strings.Split(p.stdout.String(), "\n") {
			f := strings.Fields(line)
			if len(f) < 4 || f[0] != key.String() {
				continue
			}
			switch {
			case f[2] == "held" && f[3] == strconv.Itoa(int(holderPID)):
				held = true
			case f[2] == "waiting" && f[3] == strconv.Itoa(int(waiterPID)):
				waiting = true
			}
		}
		if !held || !waiting {
			t.Errorf("pglock status %q:\n%s\nwant the holder %d and the waiter %d", args, p.stdout.String(), holderPID, waiterPID)
		}
	}

	// --json parses, and says the same.
	p := e.pglock(nil, "status", e.dsnArg(), "--key", "status", "--json")
	e.want(p, 0)
	var got []holderJSON
	if err := json.Unmarshal(p.stdout.Bytes(), &got); err != nil {
		t.Fatalf("--json output does not parse: %v\n%s", err, p.stdout.String())
	}
	classid, objid, objsubid := key.LockRow()
	if len(got) != 2 || got[0].PID != holderPID || !got[0].Granted || got[1].PID != waiterPID || got[1].Granted {
		t.Fatalf("--json = %+v, want the holder %d then the waiter %d", got, holderPID, waiterPID)
	}
	for _, h := range got {
		if h.Key != key.String() || h.Name != "status" || h.Int64 == nil || *h.Int64 != v ||
			h.ClassID != classid || h.ObjID != objid || h.ObjSubID != objsubid ||
			h.Mode != "exclusive" || h.Since == nil || h.BackendStart == nil || h.ClientAddr != "127.0.0.1" {
			t.Errorf("--json element %+v does not describe key %q (%s) held from 127.0.0.1", h, "status", key)
		}
	}

	e.unlockAll(holder)
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	e.unlockAll(waiter)

	// Nothing held: a sentence, and an empty JSON array.
	p = e.pglock(nil, "status", e.dsnArg(), "--pair", "3,4")
	e.want(p, 0)
	if !strings.Contains(p.stdout.String(), "no session holds or waits for pair:3,4") {
		t.Errorf("status of a free key: %q", p.stdout.String())
	}
	e.await("no advisory lock left", func() (bool, error) {
		p = e.pglock(nil, "status", e.dsnArg(), "--json")
		return strings.TrimSpace(p.stdout.String()) == "[]", nil
	})
}

func TestStatusShowsRun(t *testing.T) {
	e := newEnv(t)
	p := e.start(nil, "", append([]string{"run", e.dsnArg(), "--pair", "-1,2", "--shared", "--"}, marksCmd("A")...)...)
	e.awaitFile(e.dir+"/marks", "start A")
	s := e.pglock([]string{"DATABASE_URL=" + e.dsn}, "status", "--json")
	e.want(s, 0)
	var got []holderJSON
	if err := json.Unmarshal(s.stdout.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Key != "pair:-1,2" || len(got[0].Pair) != 2 || got[0].Pair[0] != -1 || got[0].Pair[1] != 2 ||
		got[0].Mode != "shared" || got[0].ApplicationName != "pglock run: sh" {
		t.Errorf("status --json = %+v, want pglock run's shared hold of pair:-1,2", got)
	}
	touch(t, e.dir+"/release-A")
	e.wait(p)
	e.want(p, 0)
}
