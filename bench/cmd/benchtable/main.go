// Command benchtable reads `go test -bench` output (several -count runs)
// on stdin and writes Markdown tables of medians, with ratios against the
// floor (raw-pgx), for BENCHMARKS.md.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// result is the values of one unit for one benchmark, one per run.
type result map[string][]float64

// benchLine matches "BenchmarkGroup/sub-2   N   v unit   v unit ...";
// the sub-benchmark is optional.
var benchLine = regexp.MustCompile(`^Benchmark([A-Za-z0-9]+)(?:/(\S+?))?(?:-\d+)?\s+\d+\s+(.*)$`)

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "benchtable:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	groups := map[string]map[string]result{}
	var groupOrder []string
	subOrder := map[string][]string{}
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		group, sub, fields := m[1], m[2], strings.Fields(m[3])
		if sub == "" {
			sub = "advisory"
		}
		if groups[group] == nil {
			groups[group] = map[string]result{}
			groupOrder = append(groupOrder, group)
		}
		if groups[group][sub] == nil {
			groups[group][sub] = result{}
			subOrder[group] = append(subOrder[group], sub)
		}
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				return fmt.Errorf("%q: %w", sc.Text(), err)
			}
			groups[group][sub][fields[i+1]] = append(groups[group][sub][fields[i+1]], v)
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	for _, g := range groupOrder {
		writeGroup(out, g, subOrder[g], groups[g])
	}
	return nil
}

// columns of each group: unit, heading; and the ratio each group reports.
var columns = map[string][][2]string{
	"Cycle":     {{"ns/op", "ns/op"}, {"p50-ns", "p50"}, {"p99-ns", "p99"}},
	"Handoff":   {{"p50-ns", "hand-off p50"}, {"p99-ns", "hand-off p99"}},
	"Contended": {{"ops/s", "ops/s"}, {"clients-served", "clients served"}, {"min-share", "least served / fair share"}},
	"ManyKeys":  {{"p50-ns", "lock p50"}, {"ns/op", "lock+unlock"}, {"lock-round-trips", "lock round trips"}, {"round-trips/op", "round trips/op"}, {"B/held-lock", "client B/held lock"}},
	"TxCycle":   {{"ns/op", "ns/op"}, {"p50-ns", "p50"}, {"p99-ns", "p99"}},
	"Failover":  {{"p50-ns", "new leader p50"}, {"p99-ns", "new leader p99"}, {"stepdown-p50-ns", "old leader step-down p50"}, {"stepdown-p99-ns", "step-down p99"}},
}

// floors names each group's floor, raw-pgx unless named here.
var floors = map[string]string{"TxCycle": "raw-pgx-session"}

func floorOf(group string) string {
	if f, ok := floors[group]; ok {
		return f
	}
	return "raw-pgx"
}

func writeGroup(out io.Writer, group string, subs []string, res map[string]result) {
	switch group {
	case "Interleaved":
		writeInterleaved(out, group, subs, res)
		return
	case "ContendedInterleaved", "ContendedProcesses", "CycleAblation": // no sub-benchmarks: one kind
		kind := map[string]string{"ContendedInterleaved": "one process", "ContendedProcesses": "16 processes", "CycleAblation": "cycle"}[group]
		writeInterleaved(out, group, []string{kind}, map[string]result{kind: res["advisory"]})
		return
	}
	cols := columns[group]
	if cols == nil {
		return
	}
	fmt.Fprintf(out, "\n### %s\n\n| subject | runs |", group)
	for _, c := range cols {
		fmt.Fprintf(out, " %s |", c[1])
	}
	ratio := ""
	floor := floorOf(group)
	switch group {
	case "Cycle", "TxCycle":
		ratio = "throughput vs " + floor
	case "Contended":
		ratio = "vs raw-pgx"
	case "Handoff":
		ratio = "p50 vs advisory-session"
	case "Failover":
		ratio = "p50: raw-pgx / subject"
	}
	if ratio != "" {
		fmt.Fprintf(out, " %s |", ratio)
	}
	fmt.Fprint(out, "\n|---|---|")
	for range cols {
		fmt.Fprint(out, "---|")
	}
	if ratio != "" {
		fmt.Fprint(out, "---|")
	}
	fmt.Fprintln(out)
	for _, sub := range subs {
		r := res[sub]
		fmt.Fprintf(out, "| %s | %d |", sub, len(r[cols[0][0]]))
		for _, c := range cols {
			fmt.Fprintf(out, " %s |", format(c[0], r[c[0]]))
		}
		switch group {
		case "Cycle", "TxCycle":
			fmt.Fprintf(out, " %s |", ratioOf(median(res[floor]["ns/op"]), median(r["ns/op"])))
		case "Contended":
			fmt.Fprintf(out, " %s |", ratioOf(median(r["ops/s"]), median(res[floor]["ops/s"])))
		case "Handoff":
			fmt.Fprintf(out, " %s |", ratioOf(median(r["p50-ns"]), median(res["advisory-session"]["p50-ns"])))
		case "Failover":
			fmt.Fprintf(out, " %s |", ratioOf(median(res[floor]["p50-ns"]), median(r["p50-ns"])))
		}
		fmt.Fprintln(out)
	}
}

func median(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(vs))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ratioOf(a, b float64) string {
	if a == 0 || b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

// format prints the median of vs in the unit's natural scale.
func format(unit string, vs []float64) string {
	if len(vs) == 0 {
		return "–"
	}
	v := median(vs)
	if strings.HasSuffix(unit, "ns") || unit == "ns/op" {
		switch {
		case v >= 1e9:
			return fmt.Sprintf("%.2f s", v/1e9)
		case v >= 1e6:
			return fmt.Sprintf("%.2f ms", v/1e6)
		default:
			return fmt.Sprintf("%.1f µs", v/1e3)
		}
	}
	if v >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

// writeInterleaved writes the table of a benchmark that interleaves its
// subjects (Interleaved, ContendedInterleaved, ContendedProcesses): per kind
// (cycle, handoff, contended) and subject, the median p50, the median of the
// ratios to the floor measured in each run, and the backend's CPU time per op
// where the benchmark reports it (CycleAblation).
func writeInterleaved(out io.Writer, group string, kinds []string, res map[string]result) {
	fmt.Fprintf(out, "\n### %s (subjects measured in turn, one sample each per op)\n\n", group)
	fmt.Fprintln(out, "| kind | subject | runs | p50 | vs raw-pgx (same run) | backend CPU per op |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|")
	for _, kind := range kinds {
		r := res[kind]
		var names []string
		for unit := range r {
			if name, ok := strings.CutSuffix(unit, "-vs-floor"); ok {
				names = append(names, name)
			}
		}
		slices.Sort(names)
		for _, name := range names {
			fmt.Fprintf(out, "| %s | %s | %d | %s | %.2f× | %s |\n", kind, name, len(r[name+"-vs-floor"]),
				format("p50-ns", r[name+"-p50-ns"]), median(r[name+"-vs-floor"]), format("server-cpu-ns", r[name+"-server-cpu-ns"]))
		}
	}
}
