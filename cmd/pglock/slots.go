package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// --slots N: a counting semaphore on the key (advisory.AcquireSemaphore),
// for "pglock run" (hold one slot), "pglock key" (print the slot keys) and
// "pglock status" (show the semaphore as one group).

// slotsFlag is the N of --slots, at least 1; 0 when not given.
type slotsFlag int

func (f *slotsFlag) String() string {
	if f == nil || *f == 0 {
		return ""
	}
	return strconv.Itoa(int(*f))
}

func (f *slotsFlag) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 1 {
		return errors.New("want a whole number of slots, at least 1")
	}
	*f = slotsFlag(n)
	return nil
}

// lock takes the lock on r.key, or with --slots N one of the N slots of the
// semaphore on it.
func (r *runner) lock(ctx context.Context, pool *pgxpool.Pool, opts ...advisory.Option) (*advisory.Lock, error) {
	if r.slots > 0 {
		return advisory.AcquireSemaphore(ctx, pool, r.key, int(r.slots), opts...)
	}
	return advisory.Acquire(ctx, pool, r.key, opts...)
}

// heldElsewhere says, for a message, that the lock is held by others: now
// (is) or for the whole wait (was).
func (r *runner) heldElsewhere(now bool) string {
	switch {
	case r.slots > 0 && now:
		return fmt.Sprintf("all %d slots of %s are held by other sessions", r.slots, r.what)
	case r.slots > 0:
		return fmt.Sprintf("all %d slots of %s were held by other sessions", r.slots, r.what)
	case now:
		return fmt.Sprintf("the lock on %s is held by another session", r.what)
	}
	return fmt.Sprintf("the lock on %s was held by another session", r.what)
}

// slotKeys are the keys "pglock key --slots N NAME" prints for name: its
// N slot keys, each labelled with the slot's number.
func slotKeys(name string, n slotsFlag) (keys []advisory.Key, labels []string) {
	for i, k := range advisory.SemaphoreKeys(advisory.StringKey(name), int(n)) {
		keys = append(keys, k)
		labels = append(labels, fmt.Sprintf("%s slot %d of %d", printable(name), i, n))
	}
	return keys, labels
}

// writeSemaphore prints the semaphore of v.slots as one group: a line that
// names it and counts its holders and waiters, then one line a slot (its
// holders, or "free") and one line a waiter.
func (v *statusView) writeSemaphore(w io.Writer, snap *snapshot) error {
	g := semaphoreOf(v.slots, snap)
	held := 0
	for _, hs := range g.holders {
		if len(hs) > 0 {
			held++
		}
	}
	fmt.Fprintf(w, "semaphore %s: %d slots, %d held, %d waiting\n\n", v.what, len(v.slots), held, len(g.waiters))
	var buf bytes.Buffer
	tw := tabwriter.NewWriter(&buf, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SLOT\tKEY\tPID\tHELD\tWAITING\tCONNECTED\tCLIENT\tAPPLICATION")
	recorded := false
	line := func(slot, key string, h *advisory.Holder) {
		if h == nil {
			fmt.Fprintf(tw, "%s\t%s\tfree\t\t\t\t\t\n", slot, key)
			return
		}
		since := age(snap.now, h.Since)
		if !h.SinceExact {
			since += "*"
			recorded = true
		}
		heldFor, waiting := since, "-"
		if !h.Granted {
			heldFor, waiting = "-", since
		}
		client := h.ClientAddr
		if client == "" {
			client = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", slot, key, h.PID, heldFor, waiting,
			age(snap.now, h.BackendStart), client, h.ApplicationName)
	}
	for i, k := range v.slots {
		if len(g.holders[i]) == 0 {
			line(strconv.Itoa(i), k.String(), nil)
		}
		for _, h := range g.holders[i] {
			line(strconv.Itoa(i), lockText(h, snap.tools), &h)
		}
	}
	for _, h := range g.waiters {
		line("-", "waits for a slot", &h)
	}
	return flushTable(w, tw, &buf, recorded)
}

// semaphore is a reading of a semaphore's slots.
type semaphore struct {
	holders [][]advisory.Holder // by slot: the sessions that hold it
	waiters []advisory.Holder   // one row per waiting session, longest waiting first
}

// semaphoreOf groups snap's rows (the rows of slots) by slot. A waiter
// waits on one slot at a time; it is listed once.
func semaphoreOf(slots []advisory.Key, snap *snapshot) semaphore {
	g := semaphore{holders: make([][]advisory.Holder, len(slots))}
	for _, h := range snap.rows {
		i := slices.Index(slots, h.Key)
		switch {
		case i < 0:
		case h.Granted:
			g.holders[i] = append(g.holders[i], h)
		case !slices.ContainsFunc(g.waiters, func(w advisory.Holder) bool { return w.PID == h.PID }):
			g.waiters = append(g.waiters, h)
		}
	}
	slices.SortStableFunc(g.waiters, func(a, b advisory.Holder) int { return a.Since.Compare(b.Since) })
	return g
}

// semaphoreJSON is what "pglock status --slots N --json" prints.
type semaphoreJSON struct {
	Key     string       `json:"key"`            // the semaphore's key: "int64:N" or "pair:A,B"
	Name    string       `json:"name,omitempty"` // the --key NAME
	Size    int          `json:"size"`
	Slots   []slotJSON   `json:"slots"`
	Waiters []holderJSON `json:"waiters"` // sessions waiting for a slot, longest waiting first
}

// slotJSON is one slot of a semaphoreJSON.
type slotJSON struct {
	Slot    int          `json:"slot"`
	Key     string       `json:"key"`
	Holders []holderJSON `json:"holders"` // [] when free
}

func (v *statusView) semaphoreJSON(snap *snapshot) semaphoreJSON {
	g := semaphoreOf(v.slots, snap)
	rows := &statusView{} // a slot's rows carry no --key NAME: theirs is NAME#i
	out := semaphoreJSON{Key: v.sem.String(), Name: v.name, Size: len(v.slots), Slots: []slotJSON{}, Waiters: []holderJSON{}}
	for i, k := range v.slots {
		out.Slots = append(out.Slots, slotJSON{Slot: i, Key: k.String(), Holders: rows.jsonRows(&snapshot{rows: g.holders[i], blockedBy: snap.blockedBy, tools: snap.tools, now: snap.now})})
	}
	out.Waiters = rows.jsonRows(&snapshot{rows: g.waiters, blockedBy: snap.blockedBy, tools: snap.tools, now: snap.now})
	return out
}
