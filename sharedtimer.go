package advisory

import "time"

// sharedTimer is the one timer of a process-wide list of things due
// (watch_quiet.go, overdue.go): set when the first is added, it stays set
// while they come and go, so that adding one never resets it. Guarded by
// its list's mutex.
type sharedTimer struct {
	t   *time.Timer
	set bool // t will fire
}

// setUnlessSet has f run d from now, unless the timer is set.
func (st *sharedTimer) setUnlessSet(d time.Duration, f func()) {
	switch {
	case st.set:
	case st.t == nil:
		st.t = time.AfterFunc(d, f)
	default:
		st.t.Reset(d)
	}
	st.set = true
}

// fired is called by f, the timer's function, once it has fired: next > 0
// sets the timer again, next from now; otherwise it is no longer set.
func (st *sharedTimer) fired(next time.Duration) {
	if st.set = next > 0; st.set {
		st.t.Reset(next)
	}
}
