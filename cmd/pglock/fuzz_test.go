package main

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/seed0ad592b7/advisory"
)

// The seed corpora are in testdata/fuzz/Fuzz*.

func FuzzParseID(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		key, err := parseID(s)
		v, convErr := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
		if (err == nil) != (convErr == nil) {
			t.Fatalf("parseID(%q) error %v, strconv.ParseInt error %v", s, err, convErr)
		}
		if err != nil {
			return
		}
		if got, ok := key.Int64(); !ok || got != v || key != advisory.Int64Key(v) {
			t.Fatalf("parseID(%q) = %s, want int64:%d", s, key, v)
		}
		if again, err := parseID(strconv.FormatInt(v, 10)); err != nil || again != key {
			t.Fatalf("parseID does not round-trip %d: %s, %v", v, again, err)
		}
	})
}

func FuzzParsePair(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		key, err := parsePair(s)
		if err != nil {
			if key.Valid() {
				t.Fatalf("parsePair(%q) failed but returned the valid key %s", s, key)
			}
			return
		}
		a, b, ok := key.Pair()
		if !ok {
			t.Fatalf("parsePair(%q) = %s, not a pair key", s, key)
		}
		as, bs, _ := strings.Cut(s, ",")
		if x, _ := strconv.ParseInt(strings.TrimSpace(as), 10, 32); int32(x) != a {
			t.Fatalf("parsePair(%q): first %d, want %d", s, a, x)
		}
		if y, _ := strconv.ParseInt(strings.TrimSpace(bs), 10, 32); int32(y) != b {
			t.Fatalf("parsePair(%q): second %d, want %d", s, b, y)
		}
		if again, err := parsePair(strings.TrimPrefix(key.String(), "pair:")); err != nil || again != key {
			t.Fatalf("parsePair does not round-trip %s: %s, %v", key, again, err)
		}
	})
}

func FuzzParseDuration(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		d, err := parseDuration(s)
		if err != nil {
			if d != 0 {
				t.Fatalf("parseDuration(%q) failed but returned %v", s, d)
			}
			return
		}
		if d < 0 {
			t.Fatalf("parseDuration(%q) = %v, negative", s, d)
		}
		// A plain number is seconds; anything else is a Go duration.
		want, goErr := time.ParseDuration(s)
		if seconds.MatchString(s) {
			want, goErr = time.ParseDuration(s + "s")
		}
		if goErr != nil || want != d {
			t.Fatalf("parseDuration(%q) = %v, want %v (%v)", s, d, want, goErr)
		}
		if again, err := parseDuration(d.String()); err != nil || again != d {
			t.Fatalf("parseDuration does not round-trip %v: %v, %v", d, again, err)
		}
	})
}
