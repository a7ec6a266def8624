package main

import (
	"errors"
	"flag"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/seed0ad592b7/advisory"
)

// keyFlags are --key NAME, --id N and --pair A,B: at most one may be given.
type keyFlags struct {
	given     []string // "--key NAME", ... in the order given
	key       advisory.Key
	name      string // the NAME of --key, for messages
	emptyName *bool  // --empty-key: an empty NAME is meant
}

// addKeyFlags defines --key, --id, --pair and --empty-key on fs. verb says
// what the command does with the key ("lock", "show").
func addKeyFlags(fs *flag.FlagSet, verb string) *keyFlags {
	k := &keyFlags{}
	fs.Func("key", verb+" the name `NAME` (its XXH64 hash, as `pglock key` prints it)", func(s string) error {
		k.given = append(k.given, "--key")
		k.key, k.name = advisory.StringKey(s), s
		return nil
	})
	k.emptyName = fs.Bool("empty-key", false, "allow --key '' (an empty NAME is refused, as it is usually an unset variable)")
	fs.Func("id", verb+" the bigint key `N`", func(s string) error {
		k.given = append(k.given, "--id")
		key, err := parseID(s)
		k.key = key
		return err
	})
	fs.Func("pair", verb+" the two-int4 key `A,B`", func(s string) error {
		k.given = append(k.given, "--pair")
		key, err := parsePair(s)
		k.key = key
		return err
	})
	return k
}

// emptyName is the usage message for an empty NAME given without
// --empty-key, in every command that takes a NAME.
const emptyName = "the NAME is empty (an unset variable?); add --empty-key if you mean the empty name"

// check returns a usage message when more than one key flag was given, or
// none when required.
func (k *keyFlags) check(required bool) string {
	switch {
	case len(k.given) > 1:
		return "give only one of --key, --id, --pair (got " + strings.Join(k.given, ", ") + ")"
	case len(k.given) == 0 && required:
		return "missing the key: give --key NAME, --id N or --pair A,B"
	case len(k.given) == 1 && k.given[0] == "--key" && k.name == "" && !*k.emptyName:
		return "--key '': " + emptyName
	}
	return ""
}

// describe names the key for messages: `"NAME" (int64:N)` for --key,
// else the key itself.
func (k *keyFlags) describe() string {
	if len(k.given) == 1 && k.given[0] == "--key" {
		return fmt.Sprintf("%q (%s)", k.name, k.key)
	}
	return k.key.String()
}

// parseID parses the decimal bigint of --id, spaces allowed around it (as
// around each number of --pair).
func parseID(s string) (advisory.Key, error) {
	v, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return advisory.Key{}, fmt.Errorf("want a decimal integer from %d to %d", int64(-1<<63), int64(1<<63-1))
	}
	return advisory.Int64Key(v), nil
}

// parsePair parses the "A,B" of --pair: two decimal int4, spaces allowed
// around each.
func parsePair(s string) (advisory.Key, error) {
	bad := fmt.Errorf("want A,B: two decimal integers from %d to %d", int32(-1<<31), int32(1<<31-1))
	as, bs, ok := strings.Cut(s, ",")
	if !ok {
		return advisory.Key{}, bad
	}
	a, errA := strconv.ParseInt(strings.TrimSpace(as), 10, 32)
	b, errB := strconv.ParseInt(strings.TrimSpace(bs), 10, 32)
	if errA != nil || errB != nil {
		return advisory.Key{}, bad
	}
	return advisory.PairKey(int32(a), int32(b)), nil
}

// seconds is a plain decimal number of seconds, as flock -w and timeout(1)
// take them.
var seconds = regexp.MustCompile(`^([0-9]+(\.[0-9]*)?|\.[0-9]+)$`)

// errDuration describes the accepted duration syntax.
var errDuration = errors.New(`want a duration such as 1.5 (seconds), 300ms, 2m or 1h30m, not negative`)

// parseDuration parses a flag duration: a plain number of seconds ("10",
// "0.5") or a Go duration ("300ms", "1m30s"). Negative durations are
// rejected.
func parseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if seconds.MatchString(s) {
		s += "s"
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, errDuration
	}
	return d, nil
}

// durationFlag is a flag.Value for parseDuration.
type durationFlag struct {
	d   time.Duration
	set bool
}

func (f *durationFlag) String() string {
	if f == nil || !f.set {
		return ""
	}
	return f.d.String()
}

func (f *durationFlag) Set(s string) error {
	d, err := parseDuration(s)
	if err != nil {
		return err
	}
	f.d, f.set = d, true
	return nil
}

// exitCodeFlag is a flag.Value for an exit status from 0 to 255.
type exitCodeFlag int

func (f *exitCodeFlag) String() string {
	if f == nil {
		return ""
	}
	return strconv.Itoa(int(*f))
}

func (f *exitCodeFlag) Set(s string) error {
	v, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || v < 0 || v > 255 {
		return errors.New("want an exit status: a whole number from 0 to 255")
	}
	*f = exitCodeFlag(v)
	return nil
}

// flagNames matches the "-name" the flag package writes in its messages.
var flagNames = regexp.MustCompile(`(flag provided but not defined: |flag needs an argument: |for flag |for )-([A-Za-z])`)

// dashDash makes a flag package message name flags as the docs do: --name.
func dashDash(msg string) string {
	return flagNames.ReplaceAllString(msg, "$1--$2")
}
