// Command benchpair compares two sets of `go test -bench` output, before
// and after a change, run interleaved by pair.sh. Each file holds rounds,
// each begun by a line "# round N"; within a round every benchmark group
// ran in one `go test` run, so each subject is compared with its group's
// floor from the same run (the machine's speed drifts between runs, the
// ratio much less). It prints, per group and subject, the median over the
// rounds of that ratio, before and after, and the median p50 (or ops/s).
//
//	go run ./cmd/benchpair results/before.txt results/after.txt
package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

var benchLine = regexp.MustCompile(`^Benchmark([A-Za-z0-9]+)(?:/(\S+?))?(?:-\d+)?\s+\d+\s+(.*)$`)

// metric is what a group is compared on; higher is better only for ops/s.
var metric = map[string]string{
	"Cycle": "p50-ns", "TxCycle": "p50-ns", "Handoff": "p50-ns", "HandoffLong": "p50-ns",
	"Contended": "ops/s", "Failover": "p50-ns",
}

var floor = map[string]string{"TxCycle": "raw-pgx-session"}

// rounds[round][group][subject] = value of the group's metric.
type rounds []map[string]map[string]float64

func read(path string) (rounds, []string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	var rs rounds
	var order []string
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "# round") {
			rs = append(rs, map[string]map[string]float64{})
			continue
		}
		m := benchLine.FindStringSubmatch(line)
		if m == nil || len(rs) == 0 {
			continue
		}
		group, sub, fields := m[1], m[2], strings.Fields(m[3])
		if group == "Interleaved" || group == "ContendedInterleaved" {
			// Ratios measured in the run itself: NAME-vs-floor, NAME-p50-ns.
			for i := 0; i+1 < len(fields); i += 2 {
				name, ok := strings.CutSuffix(fields[i+1], "-vs-floor")
				if !ok {
					continue
				}
				v, err := strconv.ParseFloat(fields[i], 64)
				if err != nil {
					return nil, nil, fmt.Errorf("%s: %q: %w", path, line, err)
				}
				r := rs[len(rs)-1]
				g := "Interleaved/" + sub
				if group == "ContendedInterleaved" {
					g = "Interleaved/contended"
				}
				if r[g] == nil {
					r[g] = map[string]float64{}
				}
				r[g][name] = v
				if id := g + "/" + name; !seen[id] {
					seen[id] = true
					order = append(order, id)
				}
			}
			continue
		}
		unit, ok := metric[group]
		if !ok {
			continue
		}
		for i := 0; i+1 < len(fields); i += 2 {
			if fields[i+1] != unit {
				continue
			}
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				return nil, nil, fmt.Errorf("%s: %q: %w", path, line, err)
			}
			r := rs[len(rs)-1]
			if r[group] == nil {
				r[group] = map[string]float64{}
			}
			r[group][sub] = v
			if id := group + "/" + sub; !seen[id] {
				seen[id] = true
				order = append(order, id)
			}
		}
	}
	return rs, order, sc.Err()
}

// ratio is sub against the group's floor in one round: 1.00 is the floor,
// lower is worse; 0 when either is missing.
func ratio(r map[string]map[string]float64, group, sub string) float64 {
	if strings.HasPrefix(group, "Interleaved/") {
		return r[group][sub] // the run's own ratio
	}
	fl, ok := floor[group]
	if !ok {
		fl = "raw-pgx"
	}
	if fl == "" {
		return 0
	}
	f, s := r[group][fl], r[group][sub]
	if f == 0 || s == 0 {
		return 0
	}
	if metric[group] == "ops/s" {
		return s / f
	}
	return f / s
}

func median(vs []float64) float64 {
	vs = slices.DeleteFunc(slices.Clone(vs), func(v float64) bool { return v == 0 })
	if len(vs) == 0 {
		return 0
	}
	slices.Sort(vs)
	if len(vs)%2 == 1 {
		return vs[len(vs)/2]
	}
	return (vs[len(vs)/2-1] + vs[len(vs)/2]) / 2
}

func summary(rs rounds, group, sub string) (ratioMed, valueMed float64) {
	var ratios, values []float64
	for _, r := range rs {
		ratios = append(ratios, ratio(r, group, sub))
		values = append(values, r[group][sub])
	}
	return median(ratios), median(values)
}

func format(unit string, v float64) string {
	switch {
	case v == 0:
		return "–"
	case unit == "ops/s":
		return fmt.Sprintf("%.0f ops/s", v)
	case v >= 1e6:
		return fmt.Sprintf("%.2f ms", v/1e6)
	default:
		return fmt.Sprintf("%.0f µs", v/1e3)
	}
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: benchpair before.txt after.txt")
		os.Exit(2)
	}
	before, order, err := read(os.Args[1])
	if err == nil {
		var after rounds
		var more []string
		after, more, err = read(os.Args[2])
		for _, id := range more {
			if !slices.Contains(order, id) {
				order = append(order, id)
			}
		}
		if err == nil {
			write(before, after, order)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchpair:", err)
		os.Exit(1)
	}
}

func write(before, after rounds, order []string) {
	fmt.Printf("rounds: %d before, %d after; ratio = against the group's floor in the same run (1.00 = floor)\n\n", len(before), len(after))
	fmt.Println("| benchmark | ratio before | ratio after | median before | median after |")
	fmt.Println("|---|---|---|---|---|")
	for _, id := range order {
		if strings.HasPrefix(id, "Interleaved/") {
			i := strings.LastIndex(id, "/")
			group, sub := id[:i], id[i+1:]
			rb, _ := summary(before, group, sub)
			ra, _ := summary(after, group, sub)
			fmt.Printf("| %s | %.2f | %.2f | | |\n", id, rb, ra)
			continue
		}
		group, sub, _ := strings.Cut(id, "/")
		rb, vb := summary(before, group, sub)
		ra, va := summary(after, group, sub)
		fr := func(v float64) string {
			if v == 0 {
				return "–"
			}
			return fmt.Sprintf("%.2f", v)
		}
		fmt.Printf("| %s | %s | %s | %s | %s |\n", id, fr(rb), fr(ra), format(metric[group], vb), format(metric[group], va))
	}
}
