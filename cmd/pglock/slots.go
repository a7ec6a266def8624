package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// --slots N: a counting semaphore on the key (advisory.AcquireSemaphore),
// for "pglock run" (hold one slot) and "pglock key" (print the slot keys).

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
