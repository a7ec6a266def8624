package main

import (
	"bytes"
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/seed0ad592b7/advisory"
)

// lockSession is one backend as "pglock status" shows it: one line, under
// the session that blocks it.
type lockSession struct {
	pid       int32
	pos       int               // its place in the order of first rows
	activity  advisory.Holder   // its first row, for the pg_stat_activity columns
	holds     []advisory.Holder // the rows it holds
	wait      *advisory.Holder  // the row it waits for; nil if none
	blockedBy []int32           // pg_blocking_pids of a waiter
	parent    *lockSession      // the session it is shown under; nil at the top level
	children  []*lockSession
	cycle     bool // shown at the top level although a session it blocks blocks it
}

// sessionTree groups snap's rows by session and puts each waiter under a
// session that blocks it: the first (in row order) that holds the key it
// waits for, else the first that waits ahead of it in the queue. It returns
// the top-level sessions in the order of their first row; under each, the
// waiters are ordered by when their wait began. Each session's holds are
// ordered by compareKeys.
//
// A waiter whose blockers are unknown (between two wait slices, or granted
// between the two queries of a reading) is at the top level. A cycle
// (a deadlock PostgreSQL has not yet broken, or rows read a moment apart)
// is cut at one of its sessions, which is marked.
func sessionTree(snap *snapshot) []*lockSession {
	var order []*lockSession
	byPID := map[int32]*lockSession{}
	for _, h := range snap.rows {
		s := byPID[h.PID]
		if s == nil {
			s = &lockSession{pid: h.PID, pos: len(order), activity: h}
			byPID[h.PID] = s
			order = append(order, s)
		}
		switch {
		case h.Granted:
			s.holds = append(s.holds, h)
		case s.wait == nil: // a backend waits for one lock at a time
			s.wait, s.blockedBy = &h, snap.blockedBy[h.PID]
		}
	}
	for _, s := range order {
		slices.SortStableFunc(s.holds, func(a, b advisory.Holder) int { return compareKeys(a.Key, b.Key) })
		s.parent = blocker(s, byPID)
	}
	breakCycles(order)
	var roots []*lockSession
	for _, s := range order {
		if s.parent == nil {
			roots = append(roots, s)
		} else {
			s.parent.children = append(s.parent.children, s)
		}
	}
	for _, s := range order {
		slices.SortStableFunc(s.children, func(a, b *lockSession) int {
			return a.wait.Since.Compare(b.wait.Since)
		})
	}
	return roots
}

// blocker is the session s is shown under, nil if none.
func blocker(s *lockSession, byPID map[int32]*lockSession) *lockSession {
	if s.wait == nil {
		return nil
	}
	var hard, soft *lockSession
	for _, pid := range s.blockedBy {
		b := byPID[pid]
		if b == nil || b == s {
			continue
		}
		if b.holdsKey(s.wait.Key) {
			hard = earlier(hard, b)
		} else {
			soft = earlier(soft, b)
		}
	}
	if hard != nil {
		return hard
	}
	return soft
}

// earlier is the one of a and b with the earlier first row; a may be nil.
func earlier(a, b *lockSession) *lockSession {
	if a == nil || b.pos < a.pos {
		return b
	}
	return a
}

func (s *lockSession) holdsKey(k advisory.Key) bool {
	return slices.ContainsFunc(s.holds, func(h advisory.Holder) bool { return h.Key == k })
}

// breakCycles cuts every cycle of parent links: walking up from each
// session, a session met twice loses its parent and is marked.
func breakCycles(order []*lockSession) {
	const (
		onPath = 1 // on the walk being made
		done   = 2 // reaches the top level
	)
	state := map[*lockSession]int{}
	for _, s := range order {
		var path []*lockSession
		x := s
		for x != nil && state[x] == 0 {
			state[x] = onPath
			path = append(path, x)
			x = x.parent
		}
		if x != nil && state[x] == onPath {
			x.parent, x.cycle = nil, true
		}
		for _, p := range path {
			state[p] = done
		}
	}
}

// writeTree prints the sessions as a table whose first column draws the
// tree of who blocks whom.
func writeTree(w io.Writer, roots []*lockSession, snap *snapshot, allKeys bool) error {
	var buf bytes.Buffer
	tw := tabwriter.NewWriter(&buf, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PID\tWAITS FOR\tWAITING\tHOLDS\tHELD\tCONNECTED\tCLIENT\tAPPLICATION")
	recorded := false // a time is PostgreSQL's: the footnote explains the "*"
	since := func(h advisory.Holder) string {
		if h.SinceExact {
			return age(snap.now, h.Since)
		}
		recorded = true
		return age(snap.now, h.Since) + "*"
	}
	var line func(s *lockSession, lead, indent string)
	line = func(s *lockSession, lead, indent string) {
		waits, waiting := "-", "-"
		if s.wait != nil {
			waits, waiting = lockText(*s.wait, snap.tools), since(*s.wait)
			if s.cycle {
				waits += " (cycle)"
			}
		}
		held := "-"
		if len(s.holds) > 0 {
			held = since(oldest(s.holds))
		}
		client := s.activity.ClientAddr
		if client == "" {
			client = "-"
		}
		holds := holdCells(s.holds, snap.tools, allKeys)
		fmt.Fprintf(tw, "%s%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", lead, s.pid, waits, waiting, holds[0], held,
			age(snap.now, s.activity.BackendStart), client, s.activity.ApplicationName)
		more := indent
		if len(s.children) > 0 {
			more += "│"
		}
		for _, h := range holds[1:] {
			// Every cell terminated, so that the columns stay aligned below.
			fmt.Fprintf(tw, "%s\t\t\t%s\t\t\t\t\n", more, h)
		}
		for i, c := range s.children {
			if i == len(s.children)-1 {
				line(c, indent+"└─ ", indent+"   ")
			} else {
				line(c, indent+"├─ ", indent+"│  ")
			}
		}
	}
	for _, r := range roots {
		line(r, "", "")
	}
	return flushTable(w, tw, &buf, recorded)
}

// flushTable writes the table tw wrote to buf, its lines' trailing spaces
// cut, and after it, if recorded, the note on the times marked "*".
func flushTable(w io.Writer, tw *tabwriter.Writer, buf *bytes.Buffer, recorded bool) error {
	if err := tw.Flush(); err != nil {
		return err
	}
	for l := range strings.Lines(buf.String()) {
		if _, err := io.WriteString(w, strings.TrimRight(l, " \n")+"\n"); err != nil {
			return err
		}
	}
	if recorded {
		_, err := io.WriteString(w, recordedNote)
		return err
	}
	return nil
}

// recordedNote explains the times marked "*", after a blank line.
const recordedNote = "\n* PostgreSQL's time: WAITING since pg_locks.waitstart, HELD since the session last changed state (no grant time is recorded)\n"

// oldest is the hold held longest.
func oldest(hs []advisory.Holder) advisory.Holder {
	o := hs[0]
	for _, h := range hs[1:] {
		if !h.Since.IsZero() && (o.Since.IsZero() || h.Since.Before(o.Since)) {
			o = h
		}
	}
	return o
}

// maxListed is how many keys a session's line lists; past it, the line
// shows their count and range.
const maxListed = 3

// holdCells describes a session's holds: with all, one cell a hold;
// else one cell that lists them or, past maxListed, lists the keys of other
// tools and gives the count and range of the rest.
func holdCells(hs []advisory.Holder, tools map[advisory.Key]string, all bool) []string {
	if len(hs) == 0 {
		return []string{"-"}
	}
	var listed []string
	if all || len(hs) <= maxListed {
		for _, h := range hs {
			listed = append(listed, lockText(h, tools))
		}
		if all {
			return listed
		}
		return []string{strings.Join(listed, ", ")}
	}
	var rest []advisory.Holder
	for _, h := range hs {
		if tools[h.Key] != "" {
			listed = append(listed, lockText(h, tools))
		} else {
			rest = append(rest, h)
		}
	}
	switch len(rest) {
	case 0:
	case 1:
		listed = append(listed, lockText(rest[0], tools))
	default:
		listed = append(listed, lockRange(rest))
	}
	return []string{strings.Join(listed, ", ")}
}

// lockRange is "N locks LOW … HIGH", with "(M shared)" when some are.
func lockRange(hs []advisory.Holder) string {
	lo, hi, shared := hs[0].Key, hs[0].Key, 0
	for _, h := range hs {
		if compareKeys(h.Key, lo) < 0 {
			lo = h.Key
		}
		if compareKeys(h.Key, hi) > 0 {
			hi = h.Key
		}
		if h.Mode == advisory.ModeShared {
			shared++
		}
	}
	s := fmt.Sprintf("%d locks %s … %s", len(hs), lo, hi)
	if shared > 0 {
		s += fmt.Sprintf(" (%d shared)", shared)
	}
	return s
}

// compareKeys orders int64 keys by value before pair keys by (A, B).
func compareKeys(a, b advisory.Key) int {
	av, aInt := a.Int64()
	bv, bInt := b.Int64()
	switch {
	case aInt && bInt:
		return cmp.Compare(av, bv)
	case aInt != bInt:
		if aInt {
			return -1
		}
		return 1
	}
	a1, a2, _ := a.Pair()
	b1, b2, _ := b.Pair()
	return cmp.Or(cmp.Compare(a1, b1), cmp.Compare(a2, b2))
}

// lockText is a row's key, with the tool that uses it and "shared" for a
// shared lock.
func lockText(h advisory.Holder, tools map[advisory.Key]string) string {
	s := h.Key.String()
	if tool := tools[h.Key]; tool != "" {
		s += " (" + tool + ")"
	}
	if h.Mode == advisory.ModeShared {
		s += " shared"
	}
	return s
}
